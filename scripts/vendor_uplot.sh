#!/usr/bin/env bash
# Re-vendors uPlot (MIT) into the dashboard from its npm package: the page works offline, with no CDN.
# Usage: scripts/vendor_uplot.sh [VERSION]   (needs npm; the result is committed, nothing runs this at run time)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-1.6.32}
DEST=fedpeft_edge/dashboard/static/uplot
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "uplot@$VERSION" >/dev/null && tar xzf "uplot-$VERSION.tgz")
cp "$tmp/package/dist/uPlot.iife.min.js" "$tmp/package/dist/uPlot.min.css" "$tmp/package/LICENSE" "$DEST/"
sha=$(sha256sum "$tmp/uplot-$VERSION.tgz" | cut -d' ' -f1)
cat > "$DEST/SOURCE.md" <<NOTE
uPlot $VERSION (MIT licence, see LICENSE), from the npm package \`uplot@$VERSION\`
(\`npm pack uplot@$VERSION\`, tarball sha256 $sha): dist/uPlot.iife.min.js, dist/uPlot.min.css, LICENSE.
Re-vendor with scripts/vendor_uplot.sh VERSION.
NOTE
echo "vendored uPlot $VERSION into $DEST"
