"""Alignment specs: which tensor dimensions share one permutation of hidden units.

Permuting the units of a hidden space, consistently in every tensor that produces or consumes
it, leaves a network's function unchanged. A ``Group`` is one such space: ``size`` units and the
``members`` (tensor, dimension) indexed by them. The residual stream of a transformer is one
group for the whole model; each block adds an MLP-hidden group and an attention group. Attention
units are ``heads x head_dim``: a valid transform permutes whole heads and, unless rotary
embeddings pin the order inside a head (``within=False``), the dimensions inside each head, the
same for q, k, v and the output projection's input. With grouped-query attention the q rows and
output columns hold ``repeat`` query heads per key/value head, moved together.

A permutation is a LongTensor ``perm`` of length ``size``: new unit ``u`` is old unit
``perm[u]``. Specs are built from tensor names (``build``), for sequential MLPs, Llama-family
decoders, BERT-family encoders, HF ViT and CLIP vision towers; every float tensor of the
checkpoint must be covered or known to hold no hidden unit, so an unknown tensor is an error
rather than a silently broken function.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch


@dataclass(frozen=True)
class Member:
    tensor: str
    dim: int
    repeat: int = 1  # query heads per key/value head along this dim (GQA q rows, o columns)
    consumes: bool = False  # the tensor reads the units along dim (a weight's input side);
    # otherwise it produces or scales them (output rows, biases, norms, embeddings)


def _reads(tensor: str, repeat: int = 1) -> Member:
    """A Linear weight's input columns (dim 1)."""
    return Member(tensor, 1, repeat, consumes=True)


@dataclass(frozen=True)
class Probe:
    """Where a group's unit activations are read in a forward pass: the input or output of a
    module (the tensor prefix of a member); ``repeat`` as in Member."""

    module: str
    side: str  # "input" or "output"
    repeat: int = 1


@dataclass(frozen=True)
class Group:
    name: str
    size: int
    members: tuple[Member, ...]
    head_dim: int | None = None  # units form heads of head_dim units; transforms keep heads whole
    within: bool = True  # with heads: dims inside a head may move too (False under RoPE)
    probes: tuple[Probe, ...] = ()


@dataclass(frozen=True)
class Spec:
    family: str
    groups: tuple[Group, ...]
    fixed: tuple[str, ...]  # float tensors that hold no hidden unit (e.g. a head's bias)
    stem: tuple[str, ...] = ()  # tensors before the first layer (embeddings)
    layers: tuple[tuple[str, ...], ...] = ()  # each layer's (block's) tensors, in depth order

    def group(self, name: str) -> Group:
        return next(g for g in self.groups if g.name == name)

    def tensors(self) -> set[str]:
        return {m.tensor for g in self.groups for m in g.members} | set(self.fixed)


class SpecError(ValueError):
    pass


# ----------------------------------------------------------------------------- applying

def member_index(group: Group, member: Member, perm: torch.Tensor) -> torch.Tensor:
    """Index along ``member.dim`` that applies ``perm`` to it (its layout repeats heads)."""
    if member.repeat == 1:
        return perm
    hd, r = group.head_dim, member.repeat
    new = torch.arange(group.size)
    idx = torch.empty(group.size * r, dtype=torch.long)
    for copy in range(r):  # unit (head j, dim d) sits at ((j * r + copy) * hd + d)
        idx[(new.div(hd, rounding_mode="floor") * r + copy) * hd + new % hd] = (
            (perm.div(hd, rounding_mode="floor") * r + copy) * hd + perm % hd)
    return idx


def apply(spec: Spec, perms: Mapping[str, torch.Tensor],
          state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every group's permutation applied (groups missing from ``perms`` stay)."""
    out = dict(state)
    for group in spec.groups:
        perm = perms.get(group.name)
        if perm is None:
            continue
        for m in group.members:
            out[m.tensor] = out[m.tensor].index_select(m.dim, member_index(group, m, perm))
    return out


def random_permutations(spec: Spec, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random valid transform of every group (heads kept whole; within-head as allowed)."""
    perms = {}
    for g in spec.groups:
        if g.head_dim is None:
            perms[g.name] = torch.randperm(g.size, generator=generator)
            continue
        heads = g.size // g.head_dim
        order = torch.randperm(heads, generator=generator)
        perms[g.name] = torch.cat([
            h * g.head_dim + (torch.randperm(g.head_dim, generator=generator) if g.within
                              else torch.arange(g.head_dim))
            for h in order.tolist()])
    return perms


def is_valid(group: Group, perm: torch.Tensor) -> bool:
    """Whether ``perm`` is a permutation of the group's units that keeps heads whole."""
    if sorted(perm.tolist()) != list(range(group.size)):
        return False
    if group.head_dim is None:
        return True
    blocks = perm.view(-1, group.head_dim)
    heads = blocks.div(group.head_dim, rounding_mode="floor")
    if not bool((heads == heads[:, :1]).all()):
        return False
    return group.within or bool((blocks % group.head_dim
                                 == torch.arange(group.head_dim)).all())


def partial(spec: Spec, stop: int) -> tuple[dict[str, str], list[str]]:
    """Partial merging: the stem and the first ``stop`` layers merged, the rest kept by each
    model (reading the merged features). Returns how each group is solved ("free": as the
    method does, a group produced in the merged part only; "perm": a group produced on both
    sides, i.e. a transformer's residual stream, which only a permutation keeps exact in the
    kept layers; groups produced in the kept part only are not solved) and the kept tensors."""
    if not 0 <= stop <= len(spec.layers):
        raise SpecError(f"stop {stop} outside [0, {len(spec.layers)}] (the {spec.family} "
                        f"model has {len(spec.layers)} layers)")
    merged = set(spec.stem).union(*spec.layers[:stop])
    solved = {}
    for g in spec.groups:
        producers = {m.tensor for m in g.members if not m.consumes}
        if producers <= merged:
            solved[g.name] = "free"
        elif producers & merged:
            solved[g.name] = "perm"
    return solved, sorted(spec.tensors() - merged)


# ----------------------------------------------------------------------------- building

def validate(spec: Spec, shapes: Mapping[str, Sequence[int]]) -> None:
    """Every member exists with the right length; every tensor is covered or fixed."""
    problems, covered = [], set()
    for g in spec.groups:
        for m in g.members:
            covered.add(m.tensor)
            shape = shapes.get(m.tensor)
            if shape is None:
                problems.append(f"{g.name}: no tensor {m.tensor!r}")
            elif len(shape) <= m.dim or shape[m.dim] != g.size * m.repeat:
                problems.append(f"{g.name}: {m.tensor} {list(shape)} dim {m.dim} should have "
                                f"{g.size * m.repeat} entries")
    unknown = sorted(set(shapes) - covered - set(spec.fixed))
    if unknown:
        problems.append(f"the {spec.family} spec does not know these tensors: "
                        f"{', '.join(unknown[:8])}" + (" ..." if len(unknown) > 8 else ""))
    if problems:
        raise SpecError("alignment spec does not fit the checkpoint:\n  " + "\n  ".join(problems))


def build(shapes: Mapping[str, Sequence[int]], config: Mapping | None = None) -> Spec:
    """The spec of a checkpoint from its tensor names and shapes (and config.json for heads)."""
    config = dict(config or {})
    names = set(shapes)
    for family, detect, builder in _FAMILIES:
        if any(re.search(detect, n) for n in names):
            spec = builder(shapes, config)
            validate(spec, shapes)
            return spec
    raise SpecError("no alignment spec for this checkpoint: known are sequential MLPs "
                    "(N.weight), Llama-family decoders, BERT-family encoders, ViT and CLIP "
                    "vision towers")


def _first(names: set[str], *candidates: str) -> str | None:
    return next((c for c in candidates if c in names), None)


def _params(names: set[str], module: str) -> list[str]:
    return [f"{module}.{p}" for p in ("weight", "bias") if f"{module}.{p}" in names]


@dataclass(frozen=True)
class _Block:
    """Module names of one transformer block (None where the family has no such module)."""

    norm1: str
    q: str
    k: str
    v: str
    o: str
    norm2: str
    up: str
    down: str
    gate: str | None = None
    residual_probe: str | None = None  # module whose input is the block's residual stream


def _transformer(family: str, shapes, blocks: list[_Block], *, hidden: int, heads: int,
                 kv_heads: int, head_dim: int, within: bool, residual_before: list[Member],
                 residual_after: list[Member], extra: list[Group], fixed: list[str],
                 residual_probes: list[Probe]) -> Spec:
    names = set(shapes)
    repeat = heads // kv_heads
    residual = list(residual_before)
    groups = []
    for i, b in enumerate(blocks):
        residual += [Member(t, 0) for t in _params(names, b.norm1) + _params(names, b.norm2)]
        residual += [_reads(f"{m}.weight") for m in (b.q, b.k, b.v, b.up)]
        residual += [Member(t, 0) for t in _params(names, b.o) + _params(names, b.down)]
        mlp = [Member(t, 0) for t in _params(names, b.up)] + [_reads(f"{b.down}.weight")]
        if b.gate is not None:
            residual.append(_reads(f"{b.gate}.weight"))
            mlp += [Member(t, 0) for t in _params(names, b.gate)]
        groups.append(Group(f"mlp.{i}", shapes[f"{b.up}.weight"][0], tuple(mlp),
                            probes=(Probe(b.down, "input"),)))
        attn = [Member(t, 0, repeat) for t in _params(names, b.q)]
        attn += [Member(t, 0) for t in _params(names, b.k) + _params(names, b.v)]
        attn.append(_reads(f"{b.o}.weight", repeat))
        groups.append(Group(f"attention.{i}", kv_heads * head_dim, tuple(attn), head_dim,
                            within, probes=(Probe(b.o, "input", repeat),)))
        residual_probes.append(Probe(b.residual_probe or b.norm1, "input"))
    residual += residual_after
    layers = tuple(tuple(t for m in (b.norm1, b.q, b.k, b.v, b.o, b.norm2, b.up, b.down, b.gate)
                         if m is not None for t in _params(names, m)) for b in blocks)
    return Spec(family, (Group("residual", hidden, tuple(residual),
                               probes=tuple(residual_probes)),
                         *groups, *extra), tuple(fixed),
                tuple(m.tensor for m in residual_before), layers)


def _layers(names: set[str], pattern: str) -> list[int]:
    found = {int(m[1]) for n in names if (m := re.match(pattern, n))}
    if found != set(range(len(found))):
        raise SpecError(f"layer numbers are not 0..N-1: {sorted(found)}")
    return sorted(found)


def _heads(config: Mapping, hidden: int, default_heads: int | None = None) -> tuple[int, int,
                                                                                    int]:
    heads = config.get("num_attention_heads") or default_heads
    if not heads:
        raise SpecError("config.json must give num_attention_heads for an attention spec")
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return heads, kv, head_dim


def _llama(shapes, config) -> Spec:
    names = set(shapes)
    embed = "model.embed_tokens.weight"
    hidden = shapes[embed][1]
    heads, kv, hd = _heads(config, hidden)
    blocks = [_Block(f"model.layers.{i}.input_layernorm", f"model.layers.{i}.self_attn.q_proj",
                     f"model.layers.{i}.self_attn.k_proj", f"model.layers.{i}.self_attn.v_proj",
                     f"model.layers.{i}.self_attn.o_proj",
                     f"model.layers.{i}.post_attention_layernorm",
                     f"model.layers.{i}.mlp.up_proj", f"model.layers.{i}.mlp.down_proj",
                     f"model.layers.{i}.mlp.gate_proj")
              for i in _layers(names, r"model\.layers\.(\d+)\.")]
    after = [Member("model.norm.weight", 0)]
    if "lm_head.weight" in names:
        after.append(_reads("lm_head.weight"))
    # rotary embeddings rotate fixed pairs of dims inside each head: heads move whole
    return _transformer("llama", shapes, blocks, hidden=hidden, heads=heads, kv_heads=kv,
                        head_dim=hd, within=False, residual_before=[Member(embed, 1)],
                        residual_after=after, extra=[], fixed=[],
                        residual_probes=[Probe("model.norm", "input")])


def _pooler(names: set[str], pooler: str, head: str | None, hidden: int) -> list[Group]:
    """A pooler's output units (dense + tanh) feed only the classifier: their own group."""
    if f"{pooler}.weight" not in names or head is None:
        return []
    return [Group("pooler", hidden, (Member(f"{pooler}.weight", 0), Member(f"{pooler}.bias", 0),
                                     _reads(f"{head}.weight")),
                  probes=(Probe(head, "input"),))]


def _bert(shapes, config) -> Spec:
    names = set(shapes)
    word = next(n for n in names if n.endswith("embeddings.word_embeddings.weight"))
    p = word[:-len("embeddings.word_embeddings.weight")]
    hidden = shapes[word][1]
    heads, kv, hd = _heads(config, hidden)
    blocks = []
    for i in _layers(names, re.escape(p) + r"encoder\.layer\.(\d+)\."):
        L = f"{p}encoder.layer.{i}."
        blocks.append(_Block(f"{L}attention.output.LayerNorm", f"{L}attention.self.query",
                             f"{L}attention.self.key", f"{L}attention.self.value",
                             f"{L}attention.output.dense", f"{L}output.LayerNorm",
                             f"{L}intermediate.dense", f"{L}output.dense",
                             residual_probe=f"{L}attention.self.query"))
    before = [Member(f"{p}embeddings.{e}.weight", 1)
              for e in ("word_embeddings", "position_embeddings", "token_type_embeddings")
              if f"{p}embeddings.{e}.weight" in names]
    before += [Member(t, 0) for t in _params(names, f"{p}embeddings.LayerNorm")]
    head = "classifier" if "classifier.weight" in names else None
    after = [_reads(f"{p}pooler.dense.weight")] if f"{p}pooler.dense.weight" in names else []
    extra = _pooler(names, f"{p}pooler.dense", head, hidden)
    fixed = [n for n in names if n.endswith("position_ids") or n.endswith("token_type_ids")]
    if head is not None:
        fixed.append("classifier.bias")
        if not extra:  # a classifier straight on the residual stream
            after.append(_reads("classifier.weight"))
    elif after:  # the pooler's output is the model's output: its units stay
        fixed += _params(names, f"{p}pooler.dense")
        after = [_reads(f"{p}pooler.dense.weight")]
    return _transformer("bert", shapes, blocks, hidden=hidden, heads=heads, kv_heads=kv,
                        head_dim=hd, within=True, residual_before=before,
                        residual_after=after, extra=extra, fixed=fixed,
                        residual_probes=[])


def _vit(shapes, config) -> Spec:
    names = set(shapes)
    new = any(re.match(r"vit\.layers\.\d+\.", n) for n in names)
    pattern = r"vit\.layers\.(\d+)\." if new else r"vit\.encoder\.layer\.(\d+)\."
    blocks = []
    for i in _layers(names, pattern):
        L = f"vit.layers.{i}." if new else f"vit.encoder.layer.{i}."
        attn = (f"{L}attention.q_proj", f"{L}attention.k_proj", f"{L}attention.v_proj",
                f"{L}attention.o_proj") if new else (
            f"{L}attention.attention.query", f"{L}attention.attention.key",
            f"{L}attention.attention.value", f"{L}attention.output.dense")
        mlp = (f"{L}mlp.fc1", f"{L}mlp.fc2") if new else (f"{L}intermediate.dense",
                                                            f"{L}output.dense")
        blocks.append(_Block(f"{L}layernorm_before", *attn, f"{L}layernorm_after", *mlp))
    hidden = shapes["vit.embeddings.cls_token"][2]
    heads, kv, hd = _heads(config, hidden)
    before = [Member("vit.embeddings.cls_token", 2),
              Member("vit.embeddings.position_embeddings", 2)]
    before += [Member(t, 0) for t in _params(names, "vit.embeddings.patch_embeddings.projection")]
    after = [Member(t, 0) for t in _params(names, "vit.layernorm")]
    head = "classifier" if "classifier.weight" in names else None
    extra = _pooler(names, "vit.pooler.dense", head, hidden)
    fixed = ["classifier.bias"] if head else []
    if head and not extra:
        after.append(_reads("classifier.weight"))
    return _transformer("vit", shapes, blocks, hidden=hidden, heads=heads, kv_heads=kv,
                        head_dim=hd, within=True, residual_before=before, residual_after=after,
                        extra=extra, fixed=fixed, residual_probes=[Probe("vit.layernorm",
                                                                         "input")])


def _clip_vision(shapes, config) -> Spec:
    names = set(shapes)
    cls = next(n for n in names if n.endswith("embeddings.class_embedding"))
    p = cls[:-len("embeddings.class_embedding")]
    hidden = shapes[cls][0]
    config = config.get("vision_config", config)
    heads, kv, hd = _heads(config, hidden)
    blocks = []
    for i in _layers(names, re.escape(p) + r"encoder\.layers\.(\d+)\."):
        L = f"{p}encoder.layers.{i}."
        blocks.append(_Block(f"{L}layer_norm1", f"{L}self_attn.q_proj", f"{L}self_attn.k_proj",
                             f"{L}self_attn.v_proj", f"{L}self_attn.out_proj",
                             f"{L}layer_norm2", f"{L}mlp.fc1", f"{L}mlp.fc2"))
    before = [Member(cls, 0), Member(f"{p}embeddings.patch_embedding.weight", 0),
              Member(f"{p}embeddings.position_embedding.weight", 1)]
    before += [Member(t, 0) for t in _params(names, f"{p}pre_layrnorm")]
    after = [Member(t, 0) for t in _params(names, f"{p}post_layernorm")]
    if "visual_projection.weight" in names:
        after.append(_reads("visual_projection.weight"))
    fixed = [n for n in names if n.endswith("position_ids")]
    return _transformer("clip_vision", shapes, blocks, hidden=hidden, heads=heads,
                        kv_heads=kv, head_dim=hd, within=True, residual_before=before,
                        residual_after=after, extra=[], fixed=fixed,
                        residual_probes=[Probe(f"{p}post_layernorm", "input")])


def _mlp(shapes, config) -> Spec:
    """Linear layers ``[prefix]N.weight`` (+ ``.bias``) applied in order of N with elementwise
    activations between them: the hidden units between consecutive layers are groups."""
    layers = sorted((int(m[2]), m[1]) for n in shapes
                    if (m := re.fullmatch(r"(.*?)(\d+)\.weight", n)) and len(shapes[n]) == 2)
    prefixes = {p for _, p in layers}
    if len(prefixes) != 1 or len(layers) < 2:
        raise SpecError("a sequential MLP spec needs 2 or more Linear layers `[prefix]N.weight` "
                        "with one prefix")
    groups = []
    for (i, p), (j, _) in zip(layers, layers[1:]):
        members = [Member(f"{p}{i}.weight", 0), _reads(f"{p}{j}.weight")]
        if f"{p}{i}.bias" in shapes:
            members.insert(1, Member(f"{p}{i}.bias", 0))
        groups.append(Group(f"hidden.{i}", shapes[f"{p}{i}.weight"][0], tuple(members),
                            probes=(Probe(f"{p}{j}", "input"),)))
    last = f"{layers[-1][1]}{layers[-1][0]}.bias"
    return Spec("mlp", tuple(groups), (last,) if last in shapes else (), (),
                tuple(tuple(_params(set(shapes), f"{p}{i}")) for i, p in layers))


_FAMILIES = (
    ("llama", r"^model\.layers\.\d+\.self_attn\.q_proj\.weight$", _llama),
    ("bert", r"(^|\.)encoder\.layer\.\d+\.attention\.self\.query\.weight$", _bert),
    ("vit", r"^vit\.(layers|encoder\.layer)\.\d+\.", _vit),
    ("clip_vision", r"(^|\.)embeddings\.class_embedding$", _clip_vision),
    ("mlp", r"^(.*?)\d+\.weight$", _mlp),
)
