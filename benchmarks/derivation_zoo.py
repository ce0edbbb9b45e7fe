"""The model zoo of benchmarks/derivations.py: derivations seen in the wild, applied to small trained models.

Every model is a Llama-architecture decoder trained on the bundled corpus (``jaxind/data/demo_corpus.txt``) read
through a byte-level BPE tokenizer of 320 tokens trained on the same text. A *base* is trained from seed ``s``; each
derivation makes a model from base ``s`` (:data:`DERIVATIONS`, one entry per derivation: adding one is one entry).
The dependent pair of a derivation is ``(base s, derived s)``; its independent counterpart is
``(base s, derived s+1)``: the same kind of pair (same shapes, tokenizers), but the derived model comes from another
base. Two entries are null by construction (H0 holds for them): ``independent`` (another base) and ``distilled`` (a
student from its own initialisation trained only on the base's outputs, issue 18 point 5).

Deterministic for a size and a seed; built lazily and memoised, so a resumed run builds only what its missing pairs
need. The distillation is a small local function (logit KL, optax); it can switch to ``jaxind.models.distill``
once that module lands.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxind.models import model, symmetry
from jaxind.models.config import ModelConfig
from jaxind.models.train import train
from jaxind.stats.upcycling import sparse_upcycle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(REPO, "jaxind", "data", "demo_corpus.txt")
VOCAB = 320
ADDED_WORDS = [" model", " models", " tokens", " the", " and", " weights", " test", " independent", " training", " of"]

SIZES: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        family="llama", vocab_size=VOCAB, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
    ),
    "small": ModelConfig(
        family="llama", vocab_size=VOCAB, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=192
    ),
}


@dataclasses.dataclass(frozen=True)
class Steps:
    """Training steps of each stage (base pre-training, fine-tune, healing after surgery, distillation)."""

    base: int = 100
    finetune: int = 30
    distill: int = 150
    batch_size: int = 8
    heal_noise: float = 0.1


QUICK_STEPS = Steps(base=30, finetune=10, distill=30)


@dataclasses.dataclass(frozen=True)
class Member:
    """One model of the zoo: config, param tree, and its tokenizer (a transformers fast tokenizer)."""

    cfg: ModelConfig
    params: Any
    tokenizer: Any


@functools.lru_cache(maxsize=1)
def tokenizers() -> dict[str, Any]:
    """``base``: byte-level BPE (320) trained on the corpus; ``extended``: base plus whole words as added tokens;
    ``transplant``: a sentencepiece-style unigram tokenizer (300, its own vocabulary, a BOS before every text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = corpus_text()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([text], trainer)
    base = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    extended = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(bpe.to_str()), eos_token="<eos>")
    extended.add_tokens(ADDED_WORDS)
    sp = Tokenizer(models.Unigram())
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    specials = ["<s>", "</s>", "<unk>"]
    sp.train_from_iterator([text], trainers.UnigramTrainer(vocab_size=300, special_tokens=specials, unk_token="<unk>"))
    sp.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", sp.token_to_id("<s>"))])
    transplant = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return {"base": base, "extended": extended, "transplant": transplant}


@functools.lru_cache(maxsize=1)
def corpus_text() -> str:
    with open(CORPUS, encoding="utf-8") as f:
        return f.read()


@functools.lru_cache(maxsize=4)
def corpus_ids(tokenizer_name: str) -> np.ndarray:
    """The corpus as token ids of one of :func:`tokenizers` (1-D int32)."""
    tok = tokenizers()[tokenizer_name]
    return np.asarray(tok(corpus_text(), add_special_tokens=False)["input_ids"], np.int32)


# --- distillation (logit KL): a local stand-in for jaxind.models.distill ---------------------------------


def _kl_loss(student, cfg_s, teacher, cfg_t, tokens, temperature):
    t_logits, _ = model.forward(teacher, cfg_t, tokens)
    s_logits, _ = model.forward(student, cfg_s, tokens)
    target = jax.nn.softmax(t_logits / temperature, -1)
    return optax.kl_divergence(jax.nn.log_softmax(s_logits / temperature, -1), target).mean()


@functools.partial(jax.jit, static_argnames=("cfg_s", "cfg_t", "optimizer", "temperature"))
def _distill_step(student, opt_state, teacher, tokens, cfg_s, cfg_t, optimizer, temperature):
    loss, grads = jax.value_and_grad(_kl_loss)(student, cfg_s, teacher, cfg_t, tokens, temperature)
    updates, opt_state = optimizer.update(grads, opt_state, student)
    return optax.apply_updates(student, updates), opt_state, loss


@functools.lru_cache(maxsize=4)
def _distill_optimizer(learning_rate: float, steps: int) -> optax.GradientTransformation:
    return optax.adamw(optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, steps // 10), steps))


def distill(
    teacher: Any,
    cfg_t: ModelConfig,
    cfg_s: ModelConfig,
    ids: np.ndarray,
    *,
    key: jax.Array,
    steps: int,
    temperature: float = 1.0,
    learning_rate: float = 3e-3,
    batch_size: int = 16,
    seq_len: int = 64,
) -> tuple[Any, list[float]]:
    """A student of config ``cfg_s`` from its own initialisation (``key``) trained only to match the teacher's
    next-token distributions (KL at ``temperature``) on windows of ``ids``; returns ``(student, losses)``."""
    student = model.init_params(cfg_s, key)
    optimizer = _distill_optimizer(learning_rate, steps)
    opt_state = optimizer.init(student)
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    losses = []
    for _ in range(steps):
        starts = rng.integers(0, ids.shape[0] - seq_len - 1, batch_size)
        tokens = jnp.asarray(np.stack([ids[s : s + seq_len] for s in starts]))
        student, opt_state, loss = _distill_step(
            student, opt_state, teacher, tokens, cfg_s, cfg_t, optimizer, temperature
        )
        losses.append(float(loss))
    return student, losses


# --- the zoo -------------------------------------------------------------------------------------------


class Zoo:
    """The models of one size, built on first use and memoised: ``zoo.base(s)``, ``zoo.derived(name, s)``."""

    def __init__(self, size: str, steps: Steps = Steps()):
        self.size, self.cfg, self.steps = size, SIZES[size], steps
        self._memo: dict[tuple[str, int], Member] = {}

    def _get(self, name: str, seed: int, make: Callable[[], Member]) -> Member:
        if (name, seed) not in self._memo:
            self._memo[(name, seed)] = make()
        return self._memo[(name, seed)]

    def base(self, seed: int) -> Member:
        """Trained from ``init_params(key(seed))`` on the corpus (BPE tokens; ``steps.base == 0``: not trained)."""

        def make() -> Member:
            init = model.init_params(self.cfg, jax.random.key(seed))
            if not self.steps.base:  # no pre-training: the initialisation itself (the benchmark's quick test)
                return Member(self.cfg, init, tokenizers()["base"])
            ids = corpus_ids("base")
            params, _ = train(init, self.cfg, ids, steps=self.steps.base, batch_size=self.steps.batch_size, seed=seed)
            return Member(self.cfg, params, tokenizers()["base"])

        return self._get("base", seed, make)

    def derived(self, name: str, seed: int) -> Member:
        """Derivation ``name`` of base ``seed``."""
        return self._get(name, seed, lambda: DERIVATIONS[name].build(self, seed))

    def heal(self, params: Any, seed: int) -> Any:
        """The healing fine-tune after surgery, by proxy: every leaf moved by ``heal_noise`` times its own std of
        Gaussian noise (keyed by ``seed``). A proxy rather than training: each new shape would compile its own
        training step, which this 2-core benchmark cannot afford (the fine-tune itself is real training)."""
        leaves, tree = jax.tree.flatten(params)
        rng = np.random.default_rng(seed + 7)
        moved = [
            np.asarray(x) + self.steps.heal_noise * float(np.std(x)) * rng.standard_normal(np.shape(x)) for x in leaves
        ]
        return jax.tree.unflatten(tree, [jnp.asarray(x, jnp.float32) for x in moved])


def _finetune(zoo: Zoo, s: int) -> Member:
    base = zoo.base(s)
    half = corpus_ids("base")[corpus_ids("base").shape[0] // 2 :]
    params, _ = train(base.params, base.cfg, half, steps=zoo.steps.finetune, batch_size=zoo.steps.batch_size,
                      learning_rate=1e-3, seed=s + 1)  # fmt: skip
    return dataclasses.replace(base, params=params)


def _permute_rotate(zoo: Zoo, s: int) -> Member:
    ft = zoo.derived("finetune", s)
    k_perm, k_rot = jax.random.split(jax.random.key(s + 2000))
    params = symmetry.apply_permutation(ft.params, ft.cfg, symmetry.draw_permutations(k_perm, ft.cfg))
    params, cfg = symmetry.rotate_residual(params, ft.cfg, symmetry.random_orthogonal(k_rot, ft.cfg.d_model))
    return Member(cfg, params, ft.tokenizer)


def _prune(zoo: Zoo, s: int) -> Member:
    """Magnitude pruning of 25% of the MLP units (smallest summed up-projection norms over layers), then healed."""
    base = zoo.base(s)
    norms = np.linalg.norm(np.asarray(base.params["layers"]["up"]), axis=1).sum(0)
    keep = np.sort(np.argsort(norms)[::-1][: base.cfg.d_ff * 3 // 4])
    layers = dict(base.params["layers"])
    layers["gate"], layers["up"] = layers["gate"][..., keep], layers["up"][..., keep]
    layers["down"] = layers["down"][:, keep, :]
    cfg = base.cfg.replace(d_ff=len(keep))
    return Member(cfg, zoo.heal(dict(base.params, layers=layers), s), base.tokenizer)


def _upscale(zoo: Zoo, s: int) -> Member:
    """SOLAR-style depth up-scaling ``A[0 : L-k] + A[k : L]`` (k = L/4; 4 -> 6 layers), then healed."""
    base = zoo.base(s)
    n, k = base.cfg.n_layers, max(1, base.cfg.n_layers // 4)
    source = np.asarray(list(range(n - k)) + list(range(k, n)))
    cfg = base.cfg.replace(n_layers=len(source))
    params = dict(base.params, layers=jax.tree.map(lambda x: x[source], base.params["layers"]))
    return Member(cfg, zoo.heal(params, s), base.tokenizer)


def _upcycle(zoo: Zoo, s: int) -> Member:
    """Sparse upcycling into a Mixtral of 4 experts (2 per token), experts = the MLP plus 30% noise."""
    base = zoo.base(s)
    params, cfg = sparse_upcycle(jax.tree.map(np.asarray, base.params), base.cfg, seed=s, n_experts=4, noise=0.3)
    return Member(cfg, params, base.tokenizer)


def _embed_rows(params: Any, tok_from: Any, strings: list[str]) -> np.ndarray:
    """Embedding rows for new tokens: the mean of the rows of each string's pieces under ``tok_from``."""
    embed = np.asarray(params["embed"])
    rows = []
    for text in strings:
        ids = tok_from(text, add_special_tokens=False)["input_ids"]
        rows.append(embed[ids].mean(0) if ids else embed.mean(0))
    return np.stack(rows)


def _with_vocab(params: Any, cfg: ModelConfig, embed: np.ndarray, head: np.ndarray) -> tuple[Any, ModelConfig]:
    out = dict(params, embed=jnp.asarray(embed))
    if "lm_head" in params:
        out["lm_head"] = jnp.asarray(head)
    return out, cfg.replace(vocab_size=embed.shape[0])


def _vocab_extend(zoo: Zoo, s: int) -> Member:
    """The tokenizer extended with whole words (rows: the mean of each word's pieces), then healed."""
    base, tok = zoo.base(s), tokenizers()["extended"]
    rows = _embed_rows(base.params, base.tokenizer, ADDED_WORDS)
    embed = np.concatenate([np.asarray(base.params["embed"]), rows])
    head = np.concatenate([np.asarray(base.params["lm_head"]), rows.T], axis=1) if "lm_head" in base.params else None
    params, cfg = _with_vocab(base.params, base.cfg, embed, head)
    return Member(cfg, zoo.heal(params, s), tok)


def _transplant(zoo: Zoo, s: int) -> Member:
    """Another tokenizer (unigram, its own vocabulary) transplanted: each new token's rows are the mean of the base
    tokenizer's pieces of its string; the body kept; then healed."""
    base, tok = zoo.base(s), tokenizers()["transplant"]
    strings = [tok.convert_tokens_to_string([t]) for t in tok.convert_ids_to_tokens(list(range(len(tok))))]
    rows = _embed_rows(base.params, base.tokenizer, strings)
    head = None
    if "lm_head" in base.params:
        head = _embed_rows({"embed": np.asarray(base.params["lm_head"]).T}, base.tokenizer, strings).T
    params, cfg = _with_vocab(base.params, base.cfg, rows, head)
    return Member(cfg, zoo.heal(params, s), tok)


def _merge(zoo: Zoo, s: int) -> Member:
    """A layer-stacked merge ("frankenmerge"): embeddings, the first half of the layers and the final norm from an
    independent donor (base ``1000 + s``), the second half of the layers from base ``s``; not healed."""
    base, donor = zoo.base(s), zoo.base(1000 + s)
    half = base.cfg.n_layers // 2
    layers = jax.tree.map(
        lambda d, b: jnp.concatenate([d[:half], b[half:]]), donor.params["layers"], base.params["layers"]
    )
    return Member(base.cfg, dict(donor.params, layers=layers), base.tokenizer)


def _distilled(zoo: Zoo, s: int) -> Member:
    """A student from its own initialisation (key ``5000 + s``) trained only on base ``s``'s logits (KL)."""
    base = zoo.base(s)
    params, _ = distill(base.params, base.cfg, base.cfg, corpus_ids("base"), key=jax.random.key(5000 + s),
                        steps=zoo.steps.distill, batch_size=zoo.steps.batch_size)  # fmt: skip
    return Member(base.cfg, params, base.tokenizer)


def _independent(zoo: Zoo, s: int) -> Member:
    return zoo.base(1000 + s)


@dataclasses.dataclass(frozen=True)
class Derivation:
    """One derivation: how to build it from base ``s``, whether the pair is dependent, a few words for the table."""

    build: Callable[[Zoo, int], Member]
    dependent: bool
    about: str


DERIVATIONS: dict[str, Derivation] = {
    "finetune": Derivation(_finetune, True, "base trained further on half the corpus (AdamW)"),
    "permute_rotate": Derivation(_permute_rotate, True, "fine-tune, hidden units permuted, residual rotated"),
    "prune": Derivation(_prune, True, "25% of MLP units pruned by magnitude, healed (noise proxy)"),
    "upscale": Derivation(_upscale, True, "depth up-scaled SOLAR-style (4 -> 6 layers), healed (noise proxy)"),
    "upcycle": Derivation(_upcycle, True, "dense -> Mixtral of 4 experts (sparse upcycling, 30% noise)"),
    "vocab_extend": Derivation(
        _vocab_extend, True, "10 words added to the tokenizer (rows: mean of their pieces), healed"
    ),
    "transplant": Derivation(
        _transplant, True, "another tokenizer (unigram) transplanted (rows: mean of pieces), healed"
    ),
    "merge": Derivation(_merge, True, "layer-stacked merge: upper half of the base on a donor's lower half"),
    "distilled": Derivation(_distilled, False, "student from its own init trained on the base's logits (H0 holds)"),
    "independent": Derivation(_independent, False, "another base trained from another seed (H0 holds)"),
}
