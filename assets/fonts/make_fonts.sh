#!/usr/bin/env bash
# Rebuilds the three embedded fonts from Debian's packages with prepare_fonts.py (see its
# docstring for what changes). Run by hand after adding Chinese text the charts must show
# (new subject names go in src/data/categories.rs, anything else in ui_text.txt); CI never
# runs it. Needs apt-get (Debian or Ubuntu) and python3.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get download fonts-dejavu-core=2.37-6 fonts-wqy-microhei=0.2.0-beta-3.1
sha256sum -c - <<'SUMS'
8892669e51aab4dc56682c8e39d8ddb7d70fad83c369344e1e240bf3ca22bb76  fonts-dejavu-core_2.37-6_all.deb
239163df984eea5c9da3b551aee374936222cdbd67f1a1be3cdcf3d76143ad66  fonts-wqy-microhei_0.2.0-beta-3.1_all.deb
SUMS
dpkg-deb -x fonts-dejavu-core_2.37-6_all.deb deb
dpkg-deb -x fonts-wqy-microhei_0.2.0-beta-3.1_all.deb deb
python3 -m venv venv
venv/bin/pip install --quiet -r "$here/requirements.txt"
venv/bin/python "$here/prepare_fonts.py" deb/usr/share/fonts/truetype/dejavu \
  deb/usr/share/fonts/truetype/wqy/wqy-microhei.ttc "$here"
ls -l "$here"/*.ttf
