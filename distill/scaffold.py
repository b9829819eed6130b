"""A new teacher's starting point: a pipeline folder with a freshly initialised network beside trained parts.

Latent and text-conditional teachers are trained like any other (``distill teacher``), on a pipeline folder:
the recipe's ``teacher:`` decides how the data is served (its VAE's latents, its text encoders' caption
embeddings) and the exported teacher keeps those parts. ``distill scaffold SPEC.yaml --out DIR`` makes that folder
from a spec:

```yaml
pipeline: StableDiffusionPipeline          # or StableDiffusion3Pipeline, StableDiffusionXLPipeline, DiTPipeline
seed: 0                                    # the network's (and new text encoders') initialisation
network: {_class_name: UNet2DConditionModel, sample_size: 8, ...}   # diffusers config of the network to train
scheduler: {_class_name: DDPMScheduler, beta_schedule: scaled_linear, prediction_type: v_prediction, ...}
vae: distill/assets/text-digits-vae        # a saved AutoencoderKL (trained), copied in
tokenizer: {path: distill/assets/text-digits-clip/tokenizer}   # a saved CLIP tokenizer folder, or
# tokenizer: {words: distill.benchmarks.text_digits.data:VOCABULARY, model_max_length: 16}   # an offline one built from words
text_encoders:                             # CLIP text encoders: saved ones (trained), or new ones from a config
  - {_class_name: CLIPTextModel, path: distill/assets/text-digits-clip/sd}
# - {_class_name: CLIPTextModel, seed: 0, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4}
```

Text encoders are frozen by every distill command; a new one stays at its seeded random initialisation, which
serves the prompts it was trained on but not new phrasings of them (``distill.benchmarks.text_digits.text_encoder`` says why and
trains the small encoders the text-digits teachers use).

Every part is saved as safetensors; the folder loads in stock diffusers (an SD3 folder without T5 with
``text_encoder_3=None, tokenizer_3=None``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from distill.errors import DistillError
from distill.typed import from_dict

TEXT_COMPONENTS = {
    "StableDiffusionPipeline": (("text_encoder", "tokenizer"),),
    "StableDiffusionXLPipeline": (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
    "StableDiffusion3Pipeline": (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
    "DiTPipeline": (),
}


@dataclass
class TokenizerSpec:
    """A saved CLIP tokenizer folder (``path``), or an offline one whose vocabulary is the given words
    (``distill.text.build_clip_tokenizer``)."""

    path: str | None = None  # a saved tokenizer folder; when given, words and model_max_length are not used
    words: str | list[str] = "distill.benchmarks.text_digits.data:VOCABULARY"  # a list, or package.module:attr naming one
    model_max_length: int = 77

    def check(self) -> list[str]:
        return [] if self.model_max_length >= 2 else [f"model_max_length must be >= 2, got {self.model_max_length}"]


@dataclass
class ScaffoldSpec:
    """What ``distill scaffold`` builds; see the module docstring."""

    pipeline: str
    network: dict[str, Any]
    scheduler: dict[str, Any]
    seed: int = 0
    vae: str | None = None  # a saved AutoencoderKL folder (latent pipelines)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    text_encoders: list[dict[str, Any]] = field(default_factory=list)  # per encoder: a saved path, or config + seed

    def check(self) -> list[str]:
        errs = []
        if self.pipeline not in TEXT_COMPONENTS:
            errs.append(f"pipeline: {self.pipeline!r} is not one of {', '.join(TEXT_COMPONENTS)}")
        else:
            need = len(TEXT_COMPONENTS[self.pipeline])
            if len(self.text_encoders) != need:
                errs.append(f"text_encoders: a {self.pipeline} takes {need} CLIP text encoder(s), got "
                            f"{len(self.text_encoders)}")
        for i, enc in enumerate(self.text_encoders):
            if "path" in enc and set(enc) - {"path", "_class_name"}:
                errs.append(f"text_encoders[{i}]: a saved encoder (path) takes no config keys, got "
                            f"{', '.join(sorted(set(enc) - {'path', '_class_name'}))}")
        for key in ("network", "scheduler"):
            if "_class_name" not in getattr(self, key):
                errs.append(f"{key}._class_name: required (the diffusers class to build)")
        return errs


def load_spec(path: str | Path) -> ScaffoldSpec:
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"scaffold spec {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DistillError(f"{path} is not valid YAML: {exc}") from exc
    return from_dict(ScaffoldSpec, data, where=f"{path.name}:")


def _words(spec: TokenizerSpec) -> list[str]:
    if isinstance(spec.words, list):
        return spec.words
    from distill.plugins import load_object

    words = load_object(spec.words, "tokenizer words")
    return list(words)


def _build(cls_name: str, config: dict[str, Any], library: Any, what: str) -> Any:
    cls = getattr(library, cls_name, None)
    if cls is None:
        raise DistillError(f"{what}: {library.__name__} has no class {cls_name!r}.")
    kwargs = {k: v for k, v in config.items() if not k.startswith("_") and k != "seed"}
    try:
        return cls.from_config(kwargs) if hasattr(cls, "from_config") and what == "scheduler" else cls(**kwargs)
    except Exception as exc:  # the library's own validation of the config
        raise DistillError(f"{what}: cannot build {cls_name}: {exc}") from exc


def build_scaffold(spec: ScaffoldSpec, out: str | Path) -> Path:
    """Write the pipeline folder ``out`` (refused if it exists and is not empty)."""
    import diffusers
    import transformers

    from distill.text import build_clip_tokenizer, clip_text_config_kwargs

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DistillError(f"{out} exists and is not empty; give a new folder for the scaffold.")
    parts: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        net = _build(spec.network["_class_name"], spec.network, diffusers, "network")
    parts["transformer" if "Transformer" in type(net).__name__ else "unet"] = net
    parts["scheduler"] = _build(spec.scheduler["_class_name"], spec.scheduler, diffusers, "scheduler")
    if spec.vae is not None:
        vae_dir = Path(spec.vae)
        if not (vae_dir / "config.json").is_file():
            raise DistillError(f"vae: {vae_dir} is not a saved AutoencoderKL folder (no config.json).")
        parts["vae"] = diffusers.AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True)
    tmp = out.with_name(out.name + ".tokenizer-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if spec.tokenizer.path is not None:
            src = Path(spec.tokenizer.path)
            if not (src / "tokenizer_config.json").is_file():
                raise DistillError(f"tokenizer.path: {src} is not a saved tokenizer folder (no tokenizer_config.json).")
            shutil.copytree(src, tmp)
            tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp)
        else:
            tokenizer = build_clip_tokenizer(_words(spec.tokenizer), tmp,
                                             model_max_length=spec.tokenizer.model_max_length)
        for (enc_name, tok_name), cfg in zip(TEXT_COMPONENTS[spec.pipeline], spec.text_encoders, strict=True):
            cls_name = cfg.get("_class_name", "CLIPTextModel")
            cls = getattr(transformers, cls_name, None)
            if cls is None:
                raise DistillError(f"text_encoders: transformers has no class {cls_name!r}.")
            if "path" in cfg:
                src = Path(cfg["path"])
                if not (src / "config.json").is_file():
                    raise DistillError(f"text_encoders: {src} is not a saved {cls_name} folder (no config.json).")
                parts[enc_name] = cls.from_pretrained(src, use_safetensors=True).eval()
                if parts[enc_name].config.vocab_size != len(tokenizer):
                    raise DistillError(f"text_encoders: {src} has a vocabulary of {parts[enc_name].config.vocab_size}"
                                       f" tokens but the tokenizer has {len(tokenizer)}; give the tokenizer it was "
                                       "trained with.")
                parts[tok_name] = tokenizer
                continue
            overrides = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "seed"}
            config = transformers.CLIPTextConfig(**{**clip_text_config_kwargs(tokenizer), **overrides})
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(cfg.get("seed", spec.seed)))
                parts[enc_name] = cls(config).eval()
            parts[tok_name] = tokenizer
        pipe_cls = getattr(diffusers, spec.pipeline)
        extra: dict[str, Any] = {}
        if spec.pipeline == "StableDiffusionPipeline":
            extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        elif spec.pipeline == "StableDiffusion3Pipeline":
            extra = {"text_encoder_3": None, "tokenizer_3": None}
        try:
            pipe = pipe_cls(**parts, **extra)
        except Exception as exc:
            raise DistillError(f"cannot assemble a {spec.pipeline} from these parts: {exc}") from exc
        pipe.save_pretrained(out, safe_serialization=True)
        for _, tok_name in TEXT_COMPONENTS[spec.pipeline]:  # keep vocab.json / merges.txt beside tokenizer.json
            for f in tmp.iterdir():
                shutil.copy2(f, out / tok_name / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
