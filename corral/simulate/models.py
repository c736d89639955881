"""Catalogue of fake models and the metadata Ollama reports for them.

Well-known names get plausible sizes and families so dashboards look real;
any other name (e.g. one pulled at runtime) gets metadata derived
deterministically from the name, so every stand-in agrees with every other.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

# Vectors are this long whatever the model: small keeps instant mode cheap,
# and the length is reported consistently in /api/show.
EMBED_DIM = 8


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str  # normalised: "llama3.2:latest"
    family: str
    parameter_size: str
    parameter_count: int
    quantization_level: str
    size: int  # bytes on disk
    context_length: int  # trained context
    embedding_length: int
    kv_bytes_per_token: int  # memory per token of context, for /api/ps sizes
    embedding_only: bool

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()

    @property
    def capabilities(self) -> list[str]:
        return ["embedding"] if self.embedding_only else ["completion", "tools"]

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }

    def loaded_size(self, num_ctx: int, parallel: int) -> int:
        # llama-server allocates num_ctx * parallel of KV cache on top of the weights.
        return self.size + num_ctx * parallel * self.kv_bytes_per_token


def _m(
    name: str,
    family: str,
    psize: str,
    count: int,
    quant: str,
    size: int,
    ctx: int,
    emb: int,
    kv: int,
    embedding_only: bool = False,
) -> ModelInfo:
    return ModelInfo(name, family, psize, count, quant, size, ctx, emb, kv, embedding_only)


_KNOWN: dict[str, ModelInfo] = {
    m.name: m
    for m in (
        _m("llama3.2:latest", "llama", "3.2B", 3_212_749_888, "Q4_K_M", 2_019_393_189,
           131_072, 3072, 114_688),
        _m("llama3.2:1b", "llama", "1.2B", 1_235_814_432, "Q8_0", 1_321_098_329,
           131_072, 2048, 32_768),
        _m("llama3.1:8b", "llama", "8.0B", 8_030_261_248, "Q4_K_M", 4_920_753_328,
           131_072, 4096, 131_072),
        _m("qwen2.5:0.5b", "qwen2", "494.03M", 494_032_768, "Q4_K_M", 397_821_319,
           32_768, 896, 12_288),
        _m("qwen2.5:7b", "qwen2", "7.6B", 7_615_616_512, "Q4_K_M", 4_683_087_332,
           32_768, 3584, 57_344),
        _m("mistral:latest", "llama", "7.2B", 7_248_023_552, "Q4_K_M", 4_372_824_384,
           32_768, 4096, 131_072),
        _m("gemma3:1b", "gemma3", "999.89M", 999_885_952, "Q4_K_M", 815_319_791,
           32_768, 1152, 26_624),
        _m("nomic-embed-text:latest", "nomic-bert", "137M", 136_727_040, "F16", 274_302_450,
           2048, EMBED_DIM, 0, True),
        _m("all-minilm:latest", "bert", "23M", 22_565_376, "F16", 45_960_996,
           512, EMBED_DIM, 0, True),
    )
}

_TAG = re.compile(r"^[^/:]+(:[^/:]+)?$")


def normalise(name: str) -> str:
    """Ollama's short model name: ``library/llama3.2`` -> ``llama3.2:latest``.

    Names compare case-insensitively in Ollama, so the result is lower-cased.
    """
    n = name.strip().lower()
    for prefix in ("https://", "http://"):
        if n.startswith(prefix):
            n = n[len(prefix) :]
    if n.startswith("registry.ollama.ai/"):
        n = n[len("registry.ollama.ai/") :]
    if n.startswith("library/"):
        n = n[len("library/") :]
    last = n.rsplit("/", 1)[-1]
    if ":" not in last:
        n += ":latest"
    return n


def valid_name(name: str) -> bool:
    """Loose version of Ollama's name check: something before an optional tag."""
    n = normalise(name)
    parts = n.split("/")
    return bool(n) and all(parts) and len(parts) <= 3 and _TAG.match(parts[-1]) is not None


def namespace(name: str) -> str:
    """Owner as /v1/models reports it: "library" for official models."""
    parts = normalise(name).split("/")
    return parts[-2] if len(parts) >= 2 else "library"


def lookup_catalogue(name: str) -> ModelInfo:
    """Metadata for any name: catalogue entry, or one derived from the name."""
    n = normalise(name)
    known = _KNOWN.get(n)
    if known is not None:
        return known
    h = int.from_bytes(hashlib.sha256(n.encode()).digest()[:4], "big")
    base = n.rsplit("/", 1)[-1].split(":", 1)[0]
    family = re.sub(r"[^a-z]", "", base) or "llama"
    embedding_only = "embed" in base or "minilm" in base
    billions = 1 + h % 8
    return ModelInfo(
        name=n,
        family=family,
        parameter_size=f"{billions}.0B",
        parameter_count=billions * 1_000_000_000,
        quantization_level="Q4_K_M",
        size=billions * 620_000_000 + h % 1_000_000,
        context_length=8192 if embedding_only else 32_768,
        embedding_length=EMBED_DIM if embedding_only else 2048,
        kv_bytes_per_token=0 if embedding_only else 32_768,
        embedding_only=embedding_only,
    )


def show_body(info: ModelInfo, modified_at: str) -> dict[str, Any]:
    """Body of /api/show (fields of ``api.ShowResponse``)."""
    arch = info.family.replace("-", "_")
    return {
        "license": "",
        "modelfile": (
            '# Modelfile generated by "ollama show"\n'
            f"FROM {info.name}\n"
            'TEMPLATE "{{ .Prompt }}"\n'
        ),
        "parameters": "" if info.embedding_only else 'stop "<|eot_id|>"',
        "template": "{{ .Prompt }}",
        "details": info.details(),
        "model_info": {
            "general.architecture": arch,
            "general.parameter_count": info.parameter_count,
            "general.quantization_version": 2,
            f"{arch}.context_length": info.context_length,
            f"{arch}.embedding_length": info.embedding_length,
        },
        "capabilities": info.capabilities,
        "modified_at": modified_at,
    }
