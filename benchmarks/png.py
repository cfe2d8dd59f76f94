"""A tiny PNG line-plot renderer (numpy + zlib), for machines without matplotlib.

``line_panels(panels, path)`` draws side-by-side panels, each with series of (x, mean, lo, hi)
points: a polyline through the means, a dot at each, and a vertical bar from lo to hi. Axis
ticks are labelled with a 3x5 pixel font (digits, '.', and a few letters); titles and legends
go in the caption of whoever embeds the image.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

# 3x5 glyphs, rows top to bottom, 3 bits each (MSB = left pixel)
_FONT = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7), "4": (5, 5, 7, 1, 1),
    "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1), "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
    ".": (0, 0, 0, 0, 2), "N": (5, 7, 7, 7, 5), "S": (7, 4, 7, 1, 7), "F": (7, 4, 6, 4, 4), "T": (7, 2, 2, 2, 2),
    "G": (7, 4, 5, 5, 7), "R": (6, 5, 6, 5, 5), "P": (7, 5, 7, 4, 4), "O": (7, 5, 5, 5, 7), "I": (7, 2, 2, 2, 7),
    "D": (6, 5, 5, 5, 6), "E": (7, 4, 6, 4, 7), "H": (5, 5, 7, 5, 5), "=": (0, 7, 0, 7, 0), " ": (0, 0, 0, 0, 0), "-": (0, 0, 7, 0, 0),
}


def write_png(path, rgb: np.ndarray) -> None:
    """rgb: [H, W, 3] uint8 -> an 8-bit RGB PNG file."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)


def _text(img, x, y, s, color, scale=2):
    for ch in s.upper():
        for r, bits in enumerate(_FONT.get(ch, _FONT[" "])):
            for c in range(3):
                if bits >> (2 - c) & 1:
                    img[y + r * scale : y + (r + 1) * scale, x + c * scale : x + (c + 1) * scale] = color
        x += 4 * scale


def _line(img, x0, y0, x1, y1, color, width=2):
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    for t in np.linspace(0, 1, n):
        x, y = int(round(x0 + t * (x1 - x0))), int(round(y0 + t * (y1 - y0)))
        img[max(y - width // 2, 0) : y + (width + 1) // 2, max(x - width // 2, 0) : x + (width + 1) // 2] = color


def line_panels(panels, path, *, ylim=(0.0, 1.0), width=420, height=300, log_x=True, chance=None):
    """panels: [(title, {series name: (rgb, [(x, mean, lo, hi), ...])})]; one panel per entry.
    ``chance``: a dashed grey level drawn across each panel."""
    margin_l, margin_b, margin_t, margin_r = 50, 30, 24, 12
    img = np.full((height, width * len(panels), 3), 255, np.uint8)
    xs = sorted({p[0] for _, series in panels for _, pts in series.values() for p in pts})
    fx = (np.log if log_x else (lambda v: v))
    lo_x, hi_x = fx(min(xs)), fx(max(xs))
    for k, (title, series) in enumerate(panels):
        ox = k * width
        x_of = lambda v: ox + margin_l + (fx(v) - lo_x) / max(hi_x - lo_x, 1e-12) * (width - margin_l - margin_r - 10) + 5
        y_of = lambda v: margin_t + (ylim[1] - v) / (ylim[1] - ylim[0]) * (height - margin_t - margin_b)
        grey, black = (200, 200, 200), (0, 0, 0)
        for v in np.linspace(ylim[0], ylim[1], 6):
            _line(img, ox + margin_l, y_of(v), ox + width - margin_r, y_of(v), grey, 1)
            _text(img, ox + 8, int(y_of(v)) - 5, f"{v:.1f}", black)
        _line(img, ox + margin_l, margin_t, ox + margin_l, height - margin_b, black, 1)
        _line(img, ox + margin_l, height - margin_b, ox + width - margin_r, height - margin_b, black, 1)
        for v in xs:
            _text(img, int(x_of(v)) - 4 * len(str(v)), height - margin_b + 8, str(v), black)
        _text(img, ox + margin_l + 4, 6, title, black)
        if chance is not None:
            for x in range(ox + margin_l, ox + width - margin_r, 10):
                _line(img, x, y_of(chance), x + 4, y_of(chance), (150, 150, 150), 1)
        for color, pts in series.values():
            pts = sorted(pts)
            for (x0, m0, _, _), (x1, m1, _, _) in zip(pts, pts[1:]):
                _line(img, x_of(x0), y_of(m0), x_of(x1), y_of(m1), color, 2)
            for x, m, lo, hi in pts:
                _line(img, x_of(x), y_of(lo), x_of(x), y_of(hi), color, 1)
                _line(img, x_of(x) - 3, y_of(lo), x_of(x) + 3, y_of(lo), color, 1)
                _line(img, x_of(x) - 3, y_of(hi), x_of(x) + 3, y_of(hi), color, 1)
                _line(img, x_of(x) - 2, y_of(m), x_of(x) + 2, y_of(m), color, 5)
    write_png(path, img)
