"""Images for the vision tower: fetching under limits, the reference's image processor, chat inputs.

For a server: `image_sources(messages)` -> `load_images(sources, policy)` (ImageError = a 400) -> render and
encode the prompt -> `prepare(ids, images, processor, vision, image_token_id, context)` -> (ids, ImageInputs) for
`generate_tokens(..., images=...)` or `Engine.add(Request(..., images=...))`.
"""

from qwen35.vision.fetch import ImageError, ImagePolicy, load_image
from qwen35.vision.inputs import EncodedImages, image_sources, load_images, prepare
from qwen35.vision.processor import ImageProcessor, ProcessedImage

__all__ = ["EncodedImages", "ImageError", "ImagePolicy", "ImageProcessor", "ProcessedImage", "image_sources",
           "load_image", "load_images", "prepare"]
