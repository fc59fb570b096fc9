#!/usr/bin/env bash
# Rebuild the chat page's static files (src/qwen35/server/static) from web/src and the npm packages pinned in
# package-lock.json. Reproducible: the same lock file and sources give byte-identical files; `--check` rebuilds
# into a temporary folder and compares with the committed bundle. Needs node >= 18 and npm (a registry).
set -euo pipefail
cd "$(dirname "$0")"
STATIC=../src/qwen35/server/static
if [[ "${1:-}" == "--check" ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  OUT="$tmp" bash "$0"
  diff -r "$tmp" "$STATIC" && echo "the committed bundle is what the sources build"
  exit
fi
OUT=${OUT:-$STATIC}
npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
rm -rf "$OUT"
mkdir -p "$OUT/katex/fonts" "$OUT/licenses"
./node_modules/.bin/esbuild src/main.js --bundle --minify --format=iife --target=es2022 --charset=utf8 \
  --legal-comments=none --log-level=warning --outfile="$OUT/app.js"
./node_modules/.bin/esbuild src/app.css --minify --charset=utf8 --log-level=warning --outfile="$OUT/app.css"
cp src/index.html "$OUT/index.html"
# KaTeX's stylesheet and fonts: woff2 only (every browser that runs the page reads it); the woff/ttf fallbacks go.
sed -E 's/,url\(fonts\/[A-Za-z0-9_-]+\.(woff|ttf)\) format\("(woff|truetype)"\)//g' \
  node_modules/katex/dist/katex.min.css > "$OUT/katex/katex.min.css"
cp node_modules/katex/dist/fonts/*.woff2 "$OUT/katex/fonts/"
cp node_modules/marked/LICENSE "$OUT/licenses/marked.txt"
cp node_modules/highlight.js/LICENSE "$OUT/licenses/highlight.js.txt"
cp node_modules/katex/LICENSE "$OUT/licenses/katex.txt"
cp node_modules/dompurify/LICENSE "$OUT/licenses/dompurify.txt"
cp node_modules/dompurify/LICENSE-MPL "$OUT/licenses/dompurify-MPL.txt"
node -e '
const pkgs = ["marked", "highlight.js", "katex", "dompurify", "esbuild"];
const out = Object.fromEntries(pkgs.map((p) => { const j = require(`./node_modules/${p}/package.json`);
  return [p, { version: j.version, license: j.license }]; }));
process.stdout.write(JSON.stringify(out, null, 2) + "\n");' > "$OUT/licenses/versions.json"
echo "built $(find "$OUT" -type f | wc -l) files in $OUT"
