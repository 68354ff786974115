"""A dependency-free PNG line chart (zlib + struct): the loss curve of a run."""
import math
import struct
import zlib
from pathlib import Path

# 3x5 pixel glyphs, rows top to bottom, '1' = ink.
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    ":": "000010000010000", "(": "010100100100010", ")": "010001001001010", "/": "001001010100100",
    " ": "000000000000000", "x": "000101010101000", "=": "000111000111000", ",": "000000000010100",
    "A": "010101111101101", "B": "110101110101110", "C": "011100100100011", "D": "110101101101110",
    "E": "111100110100111", "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "J": "001001001101010", "K": "101101110101101", "L": "100100100100111",
    "M": "101111111101101", "N": "110101101101101", "O": "010101101101010", "P": "110101110100100",
    "Q": "010101101110011", "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "U": "101101101101111", "V": "101101101101010", "W": "101101111111101", "X": "101101010101101",
    "Y": "101101010010010", "Z": "111001010100111", "_": "000000000000111",
}

WHITE, BLACK, GREY, BLUE = (255, 255, 255), (40, 40, 40), (225, 225, 225), (31, 99, 180)


class Canvas:
    def __init__(self, width, height):
        self.width, self.height = width, height
        self.pixels = bytearray(WHITE * (width * height))

    def set(self, x, y, color):
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i:i + 3] = bytes(color)

    def line(self, x0, y0, x1, y1, color, thick=1):
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            for ox in range(thick):
                for oy in range(thick):
                    self.set(x0 + ox, y0 + oy, color)
            if x0 == x1 and y0 == y1:
                break
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x, y, text, color=BLACK, scale=2):
        for ch in text.upper():
            glyph = _GLYPHS.get(ch, _GLYPHS[" "])
            for row in range(5):
                for col in range(3):
                    if glyph[row * 3 + col] == "1":
                        for sx in range(scale):
                            for sy in range(scale):
                                self.set(x + col * scale + sx, y + row * scale + sy, color)
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.pixels[3 * y * self.width:3 * (y + 1) * self.width])
                       for y in range(self.height))

        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def text_width(text: str, scale: int = 2) -> int:
    return 4 * scale * len(text)


def _ticks(low, high, count=5):
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks, step


def _label(value, step) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{value:.{decimals}f}"


def line_chart_png(path, xs, ys, *, title="", x_label="STEP", y_label="LOSS", width=720, height=420) -> Path:
    """Writes a line chart of ys over xs to `path` (PNG); returns the path."""
    canvas = Canvas(width, height)
    left, right, top, bottom = 70, 20, 40, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    x_low, x_high = min(xs), max(xs)
    finite = [y for y in ys if math.isfinite(y)]
    y_low, y_high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    pad = (y_high - y_low) * 0.05 or 0.5
    y_low, y_high = y_low - pad, y_high + pad
    if x_high == x_low:
        x_high = x_low + 1

    def px(x):
        return left + round((x - x_low) / (x_high - x_low) * plot_w)

    def py(y):
        return top + round((y_high - y) / (y_high - y_low) * plot_h)

    y_ticks, y_step = _ticks(y_low, y_high)
    for value in y_ticks:
        if y_low <= value <= y_high:
            canvas.line(left, py(value), left + plot_w, py(value), GREY)
            label = _label(value, y_step)
            canvas.text(left - 6 - text_width(label), py(value) - 5, label)
    x_ticks, x_step = _ticks(x_low, x_high)
    for value in x_ticks:
        if x_low <= value <= x_high:
            canvas.line(px(value), top, px(value), top + plot_h, GREY)
            label = _label(value, x_step)
            canvas.text(px(value) - text_width(label) // 2, top + plot_h + 8, label)
    canvas.line(left, top, left, top + plot_h, BLACK)
    canvas.line(left, top + plot_h, left + plot_w, top + plot_h, BLACK)
    points = [(px(x), py(y)) for x, y in zip(xs, ys) if math.isfinite(y)]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        canvas.line(x0, y0, x1, y1, BLUE, thick=2)
    if len(points) == 1:
        canvas.line(*points[0], *points[0], BLUE, thick=3)
    canvas.text(left, 12, title[:80])
    canvas.text(left + plot_w - text_width(x_label), height - 18, x_label)
    canvas.text(8, top - 20, y_label)
    path = Path(path)
    path.write_bytes(canvas.png())
    return path
