"""A seeded corpus of texts that stress a tokenizer's whitespace, markup, digits and scripts.

`texts(n, seed)` is deterministic: Python indented by 2, 4 or 8 spaces or tabs, markdown tables
padded with spaces, runs of 2-31 spaces (inline, leading, trailing, after newlines), blank lines,
HTML, digits, emoji, non-Latin scripts, and Gemma's control tokens written in text. Each kind
appears about equally often; a mixed kind splices them together.
"""

from __future__ import annotations

import random

WORDS = ["the", "model", "reads", "tokens", "and", "writes", "text", "while", "data", "flows",
         "through", "every", "layer", "of", "a", "small", "network", "trained", "on", "code",
         "tables", "lists", "and", "prose"]
IDENTS = ["x", "y", "total", "count", "items", "value", "result", "index", "name", "path",
          "config", "batch", "step", "loss", "tokens", "mask"]
SCRIPTS = {
    "greek": "Η γρήγορη καφέ αλεπού πηδά πάνω από τον τεμπέλη σκύλο",
    "cyrillic": "Съешь же ещё этих мягких французских булок да выпей чаю",
    "chinese": "我们 在 北京 学习 机器 翻译 和 自然 语言 处理",
    "japanese": "日本語の テキスト を トークン に 分割 します",
    "korean": "다람쥐 헌 쳇바퀴에 타고파 한국어 문장 입니다",
    "arabic": "النص العربي يكتب من اليمين إلى اليسار",
    "hebrew": "עברית נכתבת מימין לשמאל גם כן",
    "hindi": "हिन्दी भाषा देवनागरी लिपि में लिखी जाती है",
    "thai": "ภาษาไทย ไม่มี ช่องว่าง ระหว่าง คำ",
    "tamil": "தமிழ் ஒரு பழமையான மொழி ஆகும்",
}
EMOJI = ["🙂", "🚀", "👍🏽", "👩‍💻", "🇫🇷", "❤️", "🎉🎉", "🧪", "😀😃😄", "1️⃣", "🏳️‍🌈"]
HTML_TAGS = ["div", "span", "p", "table", "tr", "td", "th", "thead", "tbody", "ul", "li", "h1",
             "h2", "pre", "code", "a", "b"]
CONTROL = ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>"]


def texts(n: int = 2400, seed: int = 0) -> list[str]:
  """n texts cycling through the kinds, each drawn from one seeded generator."""
  rng = random.Random(seed)
  return [KINDS[i % len(KINDS)](rng) for i in range(n)]


def _words(rng: random.Random, k: int) -> list[str]:
  return [rng.choice(WORDS) for _ in range(k)]


def _run(rng: random.Random, low: int = 2, high: int = 31) -> str:
  return " " * rng.randint(low, high)


def python_code(rng: random.Random) -> str:
  """A function with nested blocks, blank lines, comments and aligned assignments."""
  unit = rng.choice(["  ", "    ", "        ", "\t"])
  name, arg = rng.choice(IDENTS), rng.choice(IDENTS)
  lines = [f"def {name}_{rng.randint(0, 99)}({arg}, *args):",
           f'{unit}"""{" ".join(_words(rng, 4))}."""']
  depth = 1
  for _ in range(rng.randint(3, 10)):
    ident = rng.choice(IDENTS)
    choice = rng.random()
    if choice < 0.25 and depth < 4:
      lines.append(f"{unit * depth}for {ident} in range({rng.randint(1, 1000)}):")
      depth += 1
    elif choice < 0.4 and depth < 4:
      lines.append(f"{unit * depth}if {ident} == {rng.randint(0, 9)}:  # {rng.choice(WORDS)}")
      depth += 1
    elif choice < 0.5:
      lines.append("" if rng.random() < 0.7 else unit * depth)  # blank, or only indentation
    elif choice < 0.65 and depth > 1:
      depth -= 1
      lines.append(f"{unit * depth}{ident} = {arg}{_run(rng, 1, 4)}# dedent")
    else:
      pad = " " * rng.randint(1, 8)
      lines.append(f"{unit * depth}{ident}{pad}= {rng.choice(IDENTS)}[{rng.randint(0, 64)}]")
  lines.append(f"{unit}return {arg}")
  return "\n".join(lines) + rng.choice(["\n", "\n\n", ""])


def markdown_table(rng: random.Random) -> str:
  """A table whose cells are padded with spaces so the columns line up."""
  columns = rng.randint(2, 5)
  rows = [[rng.choice(WORDS + IDENTS) for _ in range(columns)]]
  rows += [[str(rng.randint(0, 10**rng.randint(1, 6))) if rng.random() < 0.5
            else " ".join(_words(rng, rng.randint(1, 2))) for _ in range(columns)]
           for _ in range(rng.randint(1, 6))]
  widths = [max(len(row[c]) for row in rows) + rng.randint(0, 6) for c in range(columns)]
  line = lambda row: "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |"
  rule = "|" + "|".join(rng.choice(["-", ":", "-"]) + "-" * w + rng.choice(["-", ":"])
                        for w in widths) + "|"
  return "\n".join([line(rows[0]), rule] + [line(row) for row in rows[1:]])


def space_runs(rng: random.Random) -> str:
  """Words separated, led and trailed by runs of 2-31 spaces, sometimes after newlines."""
  parts = [_run(rng) if rng.random() < 0.3 else ""]
  for word in _words(rng, rng.randint(2, 8)):
    sep = rng.choice([_run(rng), _run(rng), "\n" + _run(rng), " ", "\t" + _run(rng, 0, 3)])
    parts += [word, sep]
  return "".join(parts[:-1] + [_run(rng) if rng.random() < 0.3 else ""])


def blank_lines(rng: random.Random) -> str:
  """Paragraphs separated by 1-6 blank lines, some holding spaces or tabs, some CRLF."""
  out = []
  for _ in range(rng.randint(2, 4)):
    out.append(" ".join(_words(rng, rng.randint(3, 9))))
    filler = rng.choice(["", "", " ", "  ", "\t", "    "])
    out.append((filler + "\n") * rng.randint(1, 6))
  text = "".join(p if p.endswith("\n") else p + "\n" for p in out)
  return text.replace("\n", "\r\n") if rng.random() < 0.1 else text


def tabs(rng: random.Random) -> str:
  """Tab-separated values and tab runs of 1-31 between and before fields."""
  lines = []
  for _ in range(rng.randint(2, 6)):
    fields = [rng.choice(IDENTS) if rng.random() < 0.5 else str(rng.randint(0, 99999))
              for _ in range(rng.randint(2, 5))]
    lead = "\t" * rng.randint(0, 4)
    lines.append(lead + "".join(f + "\t" * rng.randint(1, 31) for f in fields).rstrip("\t"))
  return "\n".join(lines)


def html(rng: random.Random) -> str:
  """Nested tags indented by spaces, with attributes, text and empty elements."""
  lines, stack = [], []
  for _ in range(rng.randint(3, 9)):
    indent = "  " * len(stack)
    if stack and rng.random() < 0.35:
      lines.append(f"{indent[:-2]}</{stack.pop()}>")
    elif len(stack) < 4 and rng.random() < 0.6:
      tag = rng.choice(HTML_TAGS)
      attrs = rng.choice(["", f' class="{rng.choice(IDENTS)}"', f' id="n{rng.randint(0, 99)}"'])
      lines.append(f"{indent}<{tag}{attrs}>")
      stack.append(tag)
    else:
      tag = rng.choice(HTML_TAGS)
      lines.append(f"{indent}<{tag}>{' '.join(_words(rng, 3))}</{tag}>{_run(rng, 0, 3)}")
  lines += [f"{'  ' * i}</{tag}>" for i, tag in reversed(list(enumerate(stack)))]
  return "\n".join(lines)


def digits(rng: random.Random) -> str:
  """Integers, decimals, grouped thousands, dates, versions and arithmetic."""
  forms = [lambda: str(rng.randint(0, 10**12)),
           lambda: f"{rng.uniform(-1000, 1000):.{rng.randint(1, 6)}f}",
           lambda: f"{rng.randint(0, 10**9):,}",
           lambda: f"{rng.randint(1900, 2100)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
           lambda: f"v{rng.randint(0, 9)}.{rng.randint(0, 99)}.{rng.randint(0, 999)}",
           lambda: f"{rng.randint(0, 99)} + {rng.randint(0, 99)} = {rng.randint(0, 198)}",
           lambda: f"0x{rng.randint(0, 2**32):08X}"]
  sep = rng.choice([" ", "  ", ", ", "\n", "\t"])
  return sep.join(rng.choice(forms)() for _ in range(rng.randint(2, 8)))


def emoji(rng: random.Random) -> str:
  """Emoji (with skin tones, ZWJ and flag sequences) between words and spaces."""
  parts = []
  for word in _words(rng, rng.randint(2, 6)):
    parts += [word, rng.choice(["", " ", "  "]) + rng.choice(EMOJI) * rng.randint(1, 3)]
  return rng.choice([" ", "", "\n"]).join(parts)


def scripts(rng: random.Random) -> str:
  """Sentences in non-Latin scripts, some with doubled spaces or code-switching."""
  names = rng.sample(sorted(SCRIPTS), rng.randint(1, 3))
  text = rng.choice([" ", "\n", "  ", " - "]).join(SCRIPTS[k] for k in names)
  if rng.random() < 0.4:
    text = text.replace(" ", _run(rng), rng.randint(1, 3))
  return text + rng.choice(["", " " + rng.choice(WORDS), "。", "!"])


def chat(rng: random.Random) -> str:
  """Control tokens written in text around indented or spaced content."""
  content = rng.choice([python_code, space_runs, markdown_table, html])(rng)
  turn = rng.choice(["user", "model"])
  text = f"<start_of_turn>{turn}\n{content}<end_of_turn>\n"
  if rng.random() < 0.5:
    text += f"{_run(rng, 0, 4)}{rng.choice(CONTROL)}{_run(rng, 0, 4)}{rng.choice(WORDS)}"
  return text


def mixed(rng: random.Random) -> str:
  """Two or three kinds spliced, joined by newlines or spaces."""
  kinds = rng.sample(KINDS[:-1], rng.randint(2, 3))
  return rng.choice(["\n", "\n\n", " ", "  "]).join(kind(rng) for kind in kinds)


KINDS = [python_code, markdown_table, space_runs, blank_lines, tabs, html, digits, emoji,
         scripts, chat, mixed]
