#!/usr/bin/env python3
"""Draws one transformer block's data flow, forward and backward, as the book's SVG figure:
the ops of `BlockParams::forward` in order, what each saves for backward (`BlockActivations`),
the two skip connections, and the four points where a tensor-parallel shard completes its
partial sums (`BlockComm`). The layout is computed here; scripts/book-figures runs it.

    python3 scripts/diagrams/block.py book/src/figures/ch01-block.svg
"""
import sys

W = 750
# (label, what forward saves there; None: nothing)
NODES = [("x", None), ("ln_1", "ln_1"), ("c_attn", "qkv"), ("attention", "att, att_y"), ("c_proj", None),
         ("+", "res_2"), ("ln_2", "ln_2"), ("c_fc · gelu", "fc, fc_gelu"), ("c_proj", None), ("+", "out")]
MATMULS = ("c_attn", "c_proj", "c_fc · gelu")
Y, BW, BH = 95, 62, 28
RED = "#b03030"


def main(path):
    n = len(NODES)
    xs = [W / n * (i + 0.5) for i in range(n)]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="265" viewBox="0 0 {W} 265" '
           'font-family="sans-serif" font-size="11">',
           '<defs>' + ''.join(
               f'<marker id="{m}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" markerHeight="6" '
               f'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="{c}"/></marker>' for m, c in (("a", "black"), ("b", RED)))
           + '</defs>',
           '<rect width="100%" height="100%" fill="white"/>',
           '<text x="10" y="16" font-size="13">One block, forward (black, left to right) and backward (red, right to left)</text>']
    for (name, saved), cx in zip(NODES, xs):
        if name == "x":
            out.append(f'<text x="{cx:.0f}" y="{Y + 4}" text-anchor="middle" font-size="12">x</text>')
        elif name == "+":
            out.append(f'<circle cx="{cx:.0f}" cy="{Y}" r="11" fill="white" stroke="black"/>'
                       f'<text x="{cx:.0f}" y="{Y + 4}" text-anchor="middle" font-size="13">+</text>')
        else:
            fill = "#f2b880" if name in MATMULS else ("#cfe3f3" if name.startswith("ln") else "#e8e0f0")
            out.append(f'<rect x="{cx - BW / 2:.0f}" y="{Y - BH / 2}" width="{BW}" height="{BH}" rx="4" fill="{fill}" '
                       'stroke="black" stroke-width="0.7"/>')
            out.append(f'<text x="{cx:.0f}" y="{Y + 4}" text-anchor="middle">{name}</text>')
        if saved:
            out.append(f'<text x="{cx:.0f}" y="{Y + BH / 2 + 14}" text-anchor="middle" fill="dimgrey" font-size="10">{saved}</text>')

    def half_width(i):
        return {"+": 11, "x": 6}.get(NODES[i][0], BW / 2)

    for i in range(n - 1):
        x0, x1 = xs[i] + half_width(i), xs[i + 1] - half_width(i + 1)
        out.append(f'<line x1="{x0:.0f}" y1="{Y - 4}" x2="{x1:.0f}" y2="{Y - 4}" stroke="black" marker-end="url(#a)"/>')
        out.append(f'<line x1="{x1:.0f}" y1="{Y + 6}" x2="{x0:.0f}" y2="{Y + 6}" stroke="{RED}" stroke-dasharray="3,2" '
                   'marker-end="url(#b)"/>')
    for a, b in ((0, 5), (5, 9)):  # the skips: x to the first +, res_2 to the second
        xa, xb = xs[a], xs[b]
        out.append(f'<path d="M{xa:.0f},{Y - 12} C{xa:.0f},{Y - 55} {xb:.0f},{Y - 55} {xb:.0f},{Y - 12}" fill="none" '
                   'stroke="black" marker-end="url(#a)"/>')
        out.append(f'<text x="{(xa + xb) / 2:.0f}" y="{Y - 46}" text-anchor="middle" fill="dimgrey">'
                   'skip: the gradient passes unchanged</text>')

    def hook(cx, text, ty, colour):
        out.append(f'<line x1="{cx:.0f}" y1="{Y + BH / 2 + 20}" x2="{cx:.0f}" y2="{ty - 10}" stroke="{colour}" '
                   'stroke-dasharray="2,2"/>')
        out.append(f'<text x="{cx:.0f}" y="{ty}" text-anchor="middle" fill="{colour}" font-size="10">{text}</text>')

    for i in (4, 8):  # after each output projection, before its residual sum
        hook((xs[i] + xs[i + 1]) / 2, "forward: sum_branch_output", 165, "black")
    for i in (1, 6):  # the gradient of each branch's input, before its LayerNorm's backward
        hook((xs[i] + xs[i + 1]) / 2, "backward: sum_branch_input_grad", 185, RED)
    for k, line in enumerate([
        "Grey: what forward saves for backward (BlockActivations). Orange: the matmuls, whose weights tensor parallelism splits.",
        "Dotted: where a shard of the block completes its partial sums (BlockComm); a whole block has nothing to add.",
        "Backward runs the same path right to left; at each + the gradient goes both ways, into the branch and along the skip.",
    ]):
        out.append(f'<text x="10" y="{215 + 17 * k}" fill="dimgrey">{line}</text>')
    out.append('</svg>')
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: scripts/diagrams/block.py OUT.svg")
    main(sys.argv[1])
