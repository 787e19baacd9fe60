"""Builds the fonts embedded in rlvr from Debian's font files.

    python prepare_fonts.py DEJAVU_DIR WQY_TTC OUT_DIR

DEJAVU_DIR holds DejaVuSans.ttf and DejaVuSans-Bold.ttf (fonts-dejavu-core), WQY_TTC is
wqy-microhei.ttc (fonts-wqy-microhei). Writes DejaVuSans.ttf, DejaVuSans-Bold.ttf and
WenQuanYiMicroHei-subset.ttf to OUT_DIR.

Two changes are made to the fonts:

1. WenQuanYi Micro Hei is cut to the characters the charts need (see cjk_characters),
   without its layout tables. Hinting is dropped from all three: the rasteriser (ab_glyph)
   ignores it.
2. Every glyph whose ink starts right of its origin gets a one-unit square at the origin,
   on its lowest line. plotters 0.3.7 draws each glyph's ink box at the pen position,
   ignoring the left side bearing, which spaces letters unevenly (a visible gap inside
   Chinese words). With the square, the ink box starts at the origin and every glyph lands
   where the font puts it; the square itself covers a hundredth of a pixel and is not seen.
"""

import pathlib
import sys

from fontTools import subset
from fontTools.pens.recordingPen import RecordingPen
from fontTools.pens.ttGlyphPen import TTGlyphPen
from fontTools.ttLib import TTFont
from fontTools.ttLib.tables._g_l_y_f import GlyphComponent

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Printable ASCII, Latin-1, general punctuation, arrows, minus, <=, >=, CJK punctuation,
# half- and full-width forms.
CJK_RANGES = [(0x20, 0x7E), (0xA0, 0xFF), (0x2010, 0x2027), (0x2030, 0x205E),
              (0x2190, 0x2193), (0x2212, 0x2212), (0x2264, 0x2265), (0x3000, 0x303F),
              (0xFF00, 0xFFEF)]


def cjk_characters():
    """GB 2312 (the common simplified hanzi, kana, symbols), every non-ASCII character of
    the subject tables and of ui_text.txt, and the ranges above."""
    chars = set()
    for high in range(0xA1, 0xF8):
        for low in range(0xA1, 0xFF):
            try:
                chars.add(bytes([high, low]).decode("gb2312"))
            except UnicodeDecodeError:
                pass
    for path in [ROOT / "src/data/categories.rs", ROOT / "assets/fonts/ui_text.txt"]:
        chars.update(c for c in path.read_text(encoding="utf-8") if ord(c) > 0x7E)
    for low, high in CJK_RANGES:
        chars.update(chr(c) for c in range(low, high + 1))
    chars.discard("\n")
    return sorted(ord(c) for c in chars)


def cut(font, unicodes=None):
    """Keeps `unicodes` (all when None) and drops hinting. A cut keeps no layout tables
    (the rasteriser does no shaping; they would pull in vertical and alternate forms)."""
    options = subset.Options()
    options.hinting = False
    options.layout_features = ["*"] if unicodes is None else []
    options.name_IDs = ["*"]
    options.name_languages = ["*"]
    options.notdef_outline = True
    options.drop_tables += ["FFTM"] if unicodes is None else ["FFTM", "GSUB", "GPOS", "GDEF"]
    options.glyph_names = True
    subsetter = subset.Subsetter(options)
    if unicodes is None:
        subsetter.populate(unicodes=font.getBestCmap().keys())
    else:
        subsetter.populate(unicodes=unicodes)
    subsetter.subset(font)


DOT = "rlvr.origin"


def anchor_at_origin(font):
    """Puts a one-unit square at the origin of every glyph whose ink starts right of it:
    a new contour in simple glyphs, a component pointing at a new square glyph in
    composite ones."""
    glyf = font["glyf"]
    hmtx = font["hmtx"]
    order = font.getGlyphOrder() + [DOT]
    pen = TTGlyphPen(None)
    pen.moveTo((0, 0))
    pen.lineTo((0, 1))
    pen.lineTo((1, 1))
    pen.lineTo((1, 0))
    pen.closePath()
    font.setGlyphOrder(order)
    glyf.glyphOrder = order
    glyf[DOT] = pen.glyph()
    hmtx[DOT] = (0, 0)
    if "vmtx" in font:
        font["vmtx"][DOT] = (0, 0)
    changed = 0
    for name in order[:-1]:
        glyph = glyf[name]
        if glyph.numberOfContours == 0:
            continue
        glyph.recalcBounds(glyf)
        if glyph.xMin <= 0:
            continue
        y = glyph.yMin
        if glyph.isComposite():
            dot = GlyphComponent()
            dot.glyphName = DOT
            dot.x, dot.y = 0, y
            dot.flags = 0x4  # ROUND_XY_TO_GRID, as fontTools writes offsets
            glyph.components.append(dot)
        else:
            recording = RecordingPen()
            glyph.draw(recording, glyf)
            pen = TTGlyphPen(None)
            recording.replay(pen)
            pen.moveTo((0, y))
            pen.lineTo((0, y + 1))
            pen.lineTo((1, y + 1))
            pen.lineTo((1, y))
            pen.closePath()
            glyph = pen.glyph()
            glyf[name] = glyph
        glyph.recalcBounds(glyf)
        advance, _ = hmtx[name]
        hmtx[name] = (advance, glyph.xMin)
        changed += 1
    return changed


def main():
    dejavu, wqy, out = (pathlib.Path(a) for a in sys.argv[1:4])
    out.mkdir(parents=True, exist_ok=True)
    for name in ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf"]:
        font = TTFont(dejavu / name)
        cut(font)
        n = anchor_at_origin(font)
        font.save(out / name)
        print(f"{name}: {n} glyphs anchored")
    font = TTFont(wqy, fontNumber=0)
    cut(font, cjk_characters())
    n = anchor_at_origin(font)
    font.save(out / "WenQuanYiMicroHei-subset.ttf")
    print(f"WenQuanYiMicroHei-subset.ttf: {n} glyphs anchored")


if __name__ == "__main__":
    main()
