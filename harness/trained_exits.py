"""Trained exits: the artifact file that carries them, and the adapters it attaches to a model.

An *exit artifact* is one safetensors file holding everything a training recipe learned for one model:
- exit adapters (Kangaroo, arXiv 2404.18911): per exit layer, a small module applied to that layer's hidden
  state before the shared final norm + lm_head. Ours is a residual MLP (RMSNorm -> up -> SiLU -> down, the down
  projection zero-initialised so an untrained adapter is the untrained exit). Kangaroo's adapter is one attention
  layer; a stateless adapter has no K/V of its own, so it composes with every method's KV policy (CALM's state
  copying, FREE's parallel decoding, self-speculative crops) without new cache positions to keep consistent;
- a candidate vocabulary (token ids, most frequent first) for reduced-vocabulary draft heads;
- recommended settings (self-speculative exit layer, draft length, draft confidence threshold) and calibrated
  thresholds (calm / free / dynamic), written by the recipes in `harness.train`;
- any other learned tensors under a namespaced key (the ConsistentEE policy networks, CALM's classifier);
- provenance: recipe, command, seed, data, steps, seconds, hardware, and the agreement it measured.
The file records which model it was trained for; attaching it to another model is refused with one line.

Trained drafters (the `kangaroo` and `eagle` recipes: `kangaroo.*` / `eagle.*` tensors, their recommendations and
provenance) may live in a sibling file, `<stem>.drafters.safetensors` beside the artifact, in the same format:
loading an artifact reads its sibling too (same model, checked), and saving it writes back only its own parts. The
shipped exits are two files this way, so that each stays under ~20 MB.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .config import UsageError
from .identity import file_sha256

FORMAT = "early-exit-harness/exits/1"
SIBLING = ".drafters.safetensors"  # an artifact's sibling file of trained drafters
SHIPPED_DIR = Path(__file__).parent / "data" / "exits"


class ExitAdapter(nn.Module):
    """h -> h + W_down silu(W_up rmsnorm(h)): applied to a layer's hidden state before the shared exit head."""

    def __init__(self, hidden: int, width: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.RMSNorm(hidden, eps=eps)
        self.up = nn.Linear(hidden, width, bias=False)
        self.down = nn.Linear(width, hidden, bias=False)
        nn.init.zeros_(self.down.weight)  # identity at start: training begins from the untrained exit

    def forward(self, h: torch.Tensor, product=None) -> torch.Tensor:
        """`product(weight)`: a prepared product for inference (LeanCore.product), else the modules' own."""
        up, down = (product(self.up.weight), product(self.down.weight)) if product is not None else (self.up, self.down)
        return h + down(torch.nn.functional.silu(up(self.norm(h))))

    def flops(self) -> int:
        """Multiply-adds x2 per position."""
        return 2 * 2 * self.up.weight.numel()


@dataclass
class ExitArtifact:
    """What training learned for one model, as saved in one file."""

    model: dict  # identity of the model it was trained for: fingerprint, name, num_layers, hidden_size, vocab_size
    adapters: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # exit layer -> ExitAdapter state
    adapter_width: int = 0  # hidden width of every adapter's MLP
    vocab: Optional[torch.Tensor] = None  # candidate vocabulary ids for reduced draft heads, most frequent first
    recommended: dict = field(default_factory=dict)  # per strategy: default knobs (e.g. self_speculative exit_layer)
    thresholds: dict = field(default_factory=dict)  # per strategy: calibrated knobs with their guarantee
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # other learned tensors, "<recipe>.<name>"
    provenance: dict = field(default_factory=dict)  # per recipe: command, seed, data, steps, seconds, hardware, metrics
    path: Optional[str] = None  # where it was loaded from (not saved)
    sha256: Optional[str] = None  # content hash of the file it was loaded from (not saved)
    sibling: Optional[dict] = None  # what was read from the sibling drafters file: path, sha256, keys (not saved)
    _built: dict = field(default_factory=dict, repr=False)  # prefix -> (model, module built from its tensors)

    def part(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under `prefix`, named without it (a draft module's state dict)."""
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def built(self, prefix: str, model, build):
        """The module made from the tensors under `prefix` for `model`, built once (`build()`) and reused until
        forget_built()."""
        cached = self._built.get(prefix)
        if cached is None or cached[0] is not model:
            cached = self._built[prefix] = (model, build())
        return cached[1]

    def forget_built(self) -> None:
        """Tensors changed (a recipe wrote new ones): modules built from the old ones are dropped."""
        self._built.clear()

    # -- identity ----------------------------------------------------------------------------------
    @staticmethod
    def identity(model) -> dict:
        return {"fingerprint": model.checkpoint, "name": model.name, "num_layers": model.num_layers,
                "hidden_size": model.hidden_size, "vocab_size": model.vocab_size}

    def matches(self, model) -> Optional[str]:
        """None if trained for `model`, else what differs (one phrase)."""
        ident = self.identity(model)
        for key in ("num_layers", "hidden_size", "vocab_size", "fingerprint"):
            if self.model.get(key) != ident[key]:
                return f"{key} {self.model.get(key)} != this model's {ident[key]}"
        return None

    def recipe_dtype(self, recipe: str) -> Optional[str]:
        """The dtype a recipe ran in (None: it did not run). The train CLI's `auto` is float32."""
        prov = self.provenance.get(recipe)
        if not prov:
            return None
        dtype = prov.get("dtype") or (prov.get("config") or {}).get("dtype") or "auto"
        return "float32" if dtype == "auto" else str(dtype).replace("bf16", "bfloat16").replace("fp32", "float32")

    def recipe_device(self, recipe: str) -> Optional[str]:
        """The device type a recipe ran on, cpu or cuda (None: it did not run; older artifacts: read off `hardware`)."""
        prov = self.provenance.get(recipe)
        if not prov:
            return None
        return prov.get("device_type") or ("cpu" if " CPU x" in str(prov.get("hardware", "")) else "cuda")

    def calibrated_dtype(self) -> Optional[str]:
        """The dtype its thresholds were calibrated in (None: no calibration)."""
        return self.recipe_dtype("calibrate")

    # -- file ----------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        theirs = self.sibling or {}  # the sibling's parts stay in the sibling
        flat = {f"adapter.{layer}.{k}": v.detach().to("cpu").contiguous() for layer, sd in self.adapters.items()
                for k, v in sd.items()}
        if self.vocab is not None:
            flat["vocab"] = self.vocab.to(torch.int64).cpu().contiguous()
        for k, v in self.tensors.items():
            if k not in theirs.get("tensors", ()):
                flat[f"t.{k}"] = v.detach().to("cpu").contiguous()
        mine = lambda d, part: {k: v for k, v in d.items() if k not in theirs.get(part, ())}  # noqa: E731
        meta = {"format": FORMAT, "model": self.model, "adapter_width": self.adapter_width,
                "adapter_layers": sorted(self.adapters), "recommended": mine(self.recommended, "recommended"),
                "thresholds": self.thresholds, "provenance": mine(self.provenance, "provenance")}
        tmp = path.with_suffix(path.suffix + ".tmp")
        save_file(flat, str(tmp), metadata={"harness": json.dumps(meta, sort_keys=True)})
        tmp.replace(path)  # never a half-written artifact under the real name
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ExitArtifact":
        """The artifact at `path`, with its sibling drafters file merged in when there is one."""
        art = cls.load_file(path)
        sib = Path(path).with_name(Path(path).name.removesuffix(".safetensors") + SIBLING)
        if not Path(path).name.endswith(SIBLING) and sib.is_file():
            art.merge_sibling(cls.load_file(sib))
        return art

    def merge_sibling(self, other: "ExitArtifact") -> None:
        """Take the sibling's tensors, recommendations and provenance (same model; nothing may be claimed twice)."""
        if other.model.get("fingerprint") != self.model.get("fingerprint"):
            raise UsageError(f"--exits {other.path}: made for another model than {self.path}")
        twice = (set(other.tensors) & set(self.tensors)) | (set(other.recommended) & set(self.recommended)) \
            | (set(other.provenance) & set(self.provenance))
        if twice or other.adapters:
            raise UsageError(f"--exits {other.path}: holds what {self.path} holds too ({sorted(twice)[:3]})")
        if other.vocab is not None and self.vocab is not None and not torch.equal(other.vocab, self.vocab):
            raise UsageError(f"--exits {other.path}: its candidate vocabulary differs from {self.path}'s")
        self.tensors.update(other.tensors)
        self.recommended.update(other.recommended)
        self.provenance.update(other.provenance)
        self.sibling = {"path": other.path, "sha256": other.sha256, "tensors": sorted(other.tensors),
                        "recommended": sorted(other.recommended), "provenance": sorted(other.provenance)}

    @classmethod
    def load_file(cls, path: str | Path) -> "ExitArtifact":
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("harness", "null") or "null")
                if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                    raise UsageError(f"--exits {path}: not an exit artifact of this harness (format {FORMAT})")
                flat = {k: f.get_tensor(k) for k in f.keys()}
        except UsageError:
            raise
        except Exception as e:  # unreadable, truncated or not safetensors
            raise UsageError(f"--exits {path}: cannot read it as an exit artifact ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
        adapters: dict[int, dict[str, torch.Tensor]] = {}
        tensors = {}
        for k, v in flat.items():
            if k.startswith("adapter."):
                _, layer, name = k.split(".", 2)
                adapters.setdefault(int(layer), {})[name] = v
            elif k.startswith("t."):
                tensors[k[2:]] = v
        return cls(model=meta["model"], adapters=adapters, adapter_width=meta.get("adapter_width", 0),
                   vocab=flat.get("vocab"), recommended=meta.get("recommended", {}),
                   thresholds=meta.get("thresholds", {}), tensors=tensors, provenance=meta.get("provenance", {}),
                   path=str(path), sha256=file_sha256(path))

    def modules(self, model) -> dict[int, ExitAdapter]:
        """The adapters as modules on each exit layer's device and the model's dtype."""
        out = {}
        for layer, sd in self.adapters.items():
            a = ExitAdapter(model.hidden_size, self.adapter_width, eps=getattr(model.config, "rms_norm_eps", 1e-5))
            a.load_state_dict(sd)
            dev = model.layer_devices[min(layer, model.num_layers) - 1]
            out[layer] = a.to(device=dev, dtype=model.dtype).eval().requires_grad_(False)
        return out

    def describe(self) -> dict:
        """For run logs: where it came from and what it holds."""
        return {"path": display_path(self.path), "sha256": self.sha256, "adapter_layers": sorted(self.adapters), "adapter_width": self.adapter_width,
                "vocab": None if self.vocab is None else int(self.vocab.numel()),
                "recommended": self.recommended, "thresholds": self.thresholds,
                "recipes": sorted(self.provenance),
                **({"drafters": {"path": display_path(self.sibling["path"]), "sha256": self.sibling["sha256"]}}
                   if self.sibling else {})}


def display_path(path: Optional[str]) -> Optional[str]:
    """A shipped artifact is named relative to the package (logs stay the same on every machine); others as given."""
    if path is None:
        return None
    try:
        return str(Path("harness") / Path(path).resolve().relative_to(SHIPPED_DIR.parent.parent))
    except ValueError:
        return path


def shipped_artifacts() -> list[Path]:
    """The shipped exit artifacts (each loads its sibling drafters file, if shipped, with it)."""
    return sorted(p for p in SHIPPED_DIR.glob("*.safetensors") if not p.name.endswith(SIBLING)) \
        if SHIPPED_DIR.is_dir() else []


def find_shipped(model) -> Optional[ExitArtifact]:
    """The artifact shipped in the package for this model, if any. When one is shipped for a model of the same
    name but does not match this one, says why on stderr (one line) instead of silently running untrained."""
    for path in shipped_artifacts():
        try:
            art = ExitArtifact.load(path)
        except UsageError as e:
            print(f"--exits auto: skipping {path.name}: {e}", file=sys.stderr)
            continue
        why = art.matches(model)
        if why is None:
            return art
        if art.model.get("name") == model.name:
            print(f"--exits auto: the shipped {path.name} was trained for {art.model.get('name')} with other weights "
                  f"({why}); running with untrained exits", file=sys.stderr)
    return None


def attach(model, spec: Optional[str]) -> Optional[ExitArtifact]:
    """--exits: 'auto' (the shipped artifact if one matches, else none), 'none', or a path. Sets model.exits."""
    spec = spec or "none"
    if spec == "none":
        art = None
    elif spec == "auto":
        art = find_shipped(model)
    else:
        if not Path(spec).is_file():
            raise UsageError(f"--exits {spec}: no such file (use auto, none or the path of an exit artifact)")
        art = ExitArtifact.load(spec)
        why = art.matches(model)
        if why is not None:
            raise UsageError(f"--exits {spec} was trained for another model ({why}); pass --exits none or an artifact "
                             "made for this model")
    model.set_exits(art)
    if art is not None:
        recost_where_run(model, art)
        from .speedup_model import follow_drafter_rule

        follow_drafter_rule(art)  # a drafter fit recorded under an earlier rule: its knobs follow today's
    return art


def recost_where_run(model, art: ExitArtifact) -> None:
    """A self-speculation verdict timed on another device or dtype than this model's is re-costed here, from the
    acceptance pattern the artifact keeps (speedup_model.recost), and replaces the artifact's in memory (the
    fit's own stays under `recosted_from`; the runner says so on stderr for each method that reads it, after the
    command line was checked). Without a pattern the verdict stays as it was, and the runner says where it was timed."""
    from .speedup_model import costed_on, recommendation, recost, where

    rec = recommendation(art)
    if rec is None or costed_on(art, rec) == where(model) or model.device_map:
        return
    new = recost(art, model)
    if new is None:
        return
    art.provenance["exit_adapters"] = dict(art.provenance["exit_adapters"], recommendation=new)
    art.recommended["self_speculative"] = dict(new["knobs"])
