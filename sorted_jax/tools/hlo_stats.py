"""What a compiled per-device XLA program does: its dots' FLOPs and its collectives.

`compiled.cost_analysis()` counts a while loop's body once, so it undercounts scanned layers
and chunked losses. Here the optimised HLO text (`compiled.as_text()`, one device's program
under SPMD) is parsed: every computation's instructions, which computations each one calls,
and while loops' known trip counts. A computation's multiplicity is how many times one run of
the entry executes it; dot FLOPs and collectives are weighted by it. Deterministic, so tests
can assert on it; only dots are counted (the matmul FLOPs that dominate a transformer step).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterator

_HEADER = re.compile(r"^(ENTRY\s+)?%(\S+)\s+\((.*)\)\s+->\s+(.*)\{\s*$")
_SHAPE = re.compile(r"^([a-z]+[0-9]*)\[([0-9,]*)\]")
_CALLS = re.compile(r"\b(calls|to_apply|body|condition)=%([\w.\-]+)")
_CALL_LISTS = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "all-gather-start", "all-reduce-start", "collective-permute-start")


@dataclasses.dataclass(frozen=True)
class Instruction:
    computation: str
    name: str
    opcode: str
    type: str  # result type text, e.g. "f32[768,2048]{1,0}" or a tuple "(f32[2], s32[])"
    operands: tuple[str, ...]
    attrs: str

    @property
    def op_name(self) -> str:
        """The JAX-level name XLA kept in the metadata (e.g. `jit(f)/shard_map/while`)."""
        m = re.search(r'op_name="([^"]*)"', self.attrs)
        return m.group(1) if m else ""

    @property
    def trip_count(self) -> int | None:
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', self.attrs)
        return int(m.group(1)) if m else None

    @property
    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(dtype, dims) of the result (each element of a tuple result)."""
        return [parse_shape(t) for t in _split_top(self.type.strip("()"))
                if _SHAPE.match(t.strip())]

    @property
    def bytes(self) -> int:
        return sum(math.prod(dims) * _itemsize(dt) for dt, dims in self.shapes)


@dataclasses.dataclass(frozen=True)
class Weighted:
    """An instruction and how many times one run of the program executes it."""

    instruction: Instruction
    count: int
    loops: tuple[str, ...]  # the enclosing while loops' `op_name`s, outermost first

    @property
    def in_loop(self) -> bool:
        return bool(self.loops)


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    m = _SHAPE.match(text.strip())
    if not m:
        raise ValueError(f"not an array shape: {text!r}")
    dims = tuple(int(x) for x in m.group(2).split(",") if x)
    return m.group(1), dims


def _itemsize(dtype: str) -> int:
    if dtype == "pred":
        return 1
    bits = re.findall(r"\d+", dtype)
    return max(1, int(bits[-1]) // 8) if bits else 4


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets, braces or parentheses."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def _matching(text: str, start: int) -> int:
    """Index of the bracket closing the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced brackets in {text[:80]!r}")


def _parse_instruction(computation: str, line: str) -> Instruction | None:
    body = line.strip()
    if body.startswith("ROOT "):
        body = body[5:]
    if not body.startswith("%") or " = " not in body:
        return None
    name, rest = body[1:].split(" = ", 1)
    if rest.startswith("("):
        end = _matching(rest, 0)
        type_text, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
        type_text, rest = rest.split(" ", 1)
    paren = rest.index("(")
    opcode = rest[:paren]
    close = _matching(rest, paren)
    operands = tuple(o.split(" ")[-1].lstrip("%") for o in _split_top(rest[paren + 1:close]))
    return Instruction(computation, name, opcode, type_text, operands, rest[close + 1:])


@dataclasses.dataclass
class Program:
    """The computations of one HLO module and the entry's name."""

    computations: dict[str, list[Instruction]]
    params: dict[str, dict[str, str]]  # computation -> parameter name -> type text
    entry: str

    @classmethod
    def parse(cls, text: str) -> Program:
        comps: dict[str, list[Instruction]] = {}
        params: dict[str, dict[str, str]] = {}
        entry, current = "", None
        for line in text.splitlines():
            header = _HEADER.match(line)
            if header:
                current = header.group(2)
                comps[current] = []
                params[current] = {}
                for p in _split_top(header.group(3)):
                    if ":" in p:
                        pname, ptype = p.split(":", 1)
                        params[current][pname.strip()] = ptype.strip()
                if header.group(1):
                    entry = current
                continue
            if current is None:
                continue
            if line.startswith("}"):
                current = None
                continue
            inst = _parse_instruction(current, line)
            if inst is not None:
                comps[current].append(inst)
        if not entry:
            raise ValueError("no ENTRY computation in the HLO text")
        return cls(comps, params, entry)

    def _callees(self, inst: Instruction) -> Iterator[tuple[str, int, bool]]:
        """(computation, times per execution of inst, is a loop body/condition)."""
        trip = (inst.trip_count or 1) if inst.opcode == "while" else 1
        for kind, name in _CALLS.findall(inst.attrs):
            loop = kind in ("body", "condition")
            yield name, trip if loop else 1, loop
        for _, names in _CALL_LISTS.findall(inst.attrs):
            for n in names.split(","):
                if n.strip():
                    yield n.strip().lstrip("%"), 1, False

    def weighted(self) -> list[Weighted]:
        """Every instruction reachable from the entry, with its execution count."""
        out: list[Weighted] = []

        def visit(comp: str, count: int, loops: tuple[str, ...], depth: int = 0) -> None:
            if depth > 64 or comp not in self.computations:
                return
            for inst in self.computations[comp]:
                out.append(Weighted(inst, count, loops))
                for callee, times, loop in self._callees(inst):
                    visit(callee, count * times, (*loops, inst.op_name) if loop else loops,
                          depth + 1)

        visit(self.entry, 1, ())
        return out

    def shape_of(self, computation: str, name: str) -> str | None:
        for inst in self.computations.get(computation, ()):
            if inst.name == name:
                return inst.type
        return self.params.get(computation, {}).get(name)


def dot_flops_of(program: Program, inst: Instruction) -> float:
    """2 x output elements x contracted size of one `dot`."""
    lhs = program.shape_of(inst.computation, inst.operands[0])
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", inst.attrs)
    if lhs is None or m is None:
        return 0.0
    _, lhs_dims = parse_shape(lhs)
    contracted = math.prod(lhs_dims[int(i)] for i in m.group(1).split(",") if i)
    out = math.prod(math.prod(dims) for _, dims in inst.shapes)
    return 2.0 * out * contracted


@dataclasses.dataclass(frozen=True)
class Site:
    """A dot or collective of the program, with how often it runs and where."""

    opcode: str
    type: str
    bytes: int
    count: int
    loops: tuple[str, ...]
    flops: float = 0.0  # a dot's FLOPs per execution

    @property
    def dims(self) -> tuple[int, ...]:
        """Dims of an array result (empty for a tuple result)."""
        return parse_shape(self.type)[1] if _SHAPE.match(self.type) else ()

    def inside(self, loop_name_part: str) -> bool:
        """In a while loop whose `op_name` contains `loop_name_part` (e.g. "shard_map")."""
        return any(loop_name_part in name for name in self.loops)


@dataclasses.dataclass(frozen=True)
class ProgramStats:
    """Per-device figures of one compiled program."""

    dot_flops: float  # loops counted trip-count times
    dots: tuple[Site, ...]
    collectives: tuple[Site, ...]
    loops: tuple[tuple[str, int | None], ...]  # every while loop: (op_name, trip count)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


def analyse(hlo_text: str) -> ProgramStats:
    """Dot FLOPs and collectives of a compiled program (`jit(f).lower(...).compile().as_text()`)."""
    program = Program.parse(hlo_text)
    flops, dots, colls, loops = 0.0, [], [], []
    for w in program.weighted():
        inst = w.instruction
        if inst.opcode == "dot":
            f = dot_flops_of(program, inst)
            flops += w.count * f
            dots.append(Site(inst.opcode, inst.type, inst.bytes, w.count, w.loops, f))
        elif inst.opcode in COLLECTIVES:
            colls.append(Site(inst.opcode, inst.type, inst.bytes, w.count, w.loops))
        elif inst.opcode == "while":
            loops.append((inst.op_name, inst.trip_count))
    return ProgramStats(flops, tuple(dots), tuple(colls), tuple(loops))
