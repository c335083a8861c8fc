"""Shared pieces of the tagging examples.

- `TaggingTask`: a seeded, in-process sequence-labelling task with the
  structure of named-entity recognition (BIO tags, spans of several words,
  entity types decided by context on either side).
- `span_f1`: exact-match span precision, recall and F1.
- `Tagger` and `make_twins`: one tagger architecture built either from
  fastnlp layers or from torch / pytorch-crf layers, with identical weights,
  so that the two differ only in the layers' implementation.
- `train`: the training loop both examples use (progress bar, checkpoints,
  tokens/s, the baseline twin's steps interleaved with the model's).
"""

import argparse
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

try:
    from tqdm.auto import tqdm
except ImportError:  # the examples still run, just without a bar
    tqdm = None

ENTITY_TYPES = ("PER", "LOC", "ORG")
LABELS = ["O"] + [f"{prefix}-{kind}" for kind in ENTITY_TYPES for prefix in "BI"]


# --------------------------------------------------------------------------- the task

@dataclass
class Batch:
    tokens: Tensor   # (B, T) long, 0 = padding
    tags: Tensor     # (B, T) long, indices into LABELS (0 where padded)
    lengths: Tensor  # (B,) long, on the CPU (pack_padded_sequence wants them there)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def split(self, parts: int) -> List["Batch"]:
        """Equal slices along the batch (for data parallelism)."""
        size = self.tokens.size(0) // parts
        return [Batch(self.tokens[i * size:(i + 1) * size], self.tags[i * size:(i + 1) * size],
                      self.lengths[i * size:(i + 1) * size]) for i in range(parts)]


class TaggingTask:
    """Sentences of filler words with entity mentions whose type only context tells.

    Every entity is a run of 1-3 *name* words, and the name words are shared by
    all types, so a word alone says nothing. The type comes from a neighbour:

    - PER: a title word right before the name ("mr Smith"),
    - LOC: a preposition right before it ("in Paris"),
    - ORG: a company suffix right *after* it ("Acme inc"; the suffix is O), so
      the first word's tag depends on a word up to three positions later and
      a forward-only model cannot get it.

    Names with neither neighbour are distractors tagged O, and titles,
    prepositions and suffixes also occur alone. Mentions are separated by at
    least one filler word. Tags are BIO, so I-X only follows B-X or I-X.
    """

    PAD = 0

    def __init__(self, num_names: int = 120, num_fillers: int = 300, cue_words: int = 3,
                 min_len: int = 8, max_len: int = 40) -> None:
        self.min_len, self.max_len = min_len, max_len
        first = 1
        self.titles = list(range(first, first + cue_words))
        self.prepositions = list(range(first + cue_words, first + 2 * cue_words))
        self.suffixes = list(range(first + 2 * cue_words, first + 3 * cue_words))
        first += 3 * cue_words
        self.names = list(range(first, first + num_names))
        self.fillers = list(range(first + num_names, first + num_names + num_fillers))
        self.vocab_size = first + num_names + num_fillers
        self.label_index = {label: i for i, label in enumerate(LABELS)}

    def _span(self, rng: random.Random, kind: Optional[str]) -> Tuple[List[int], List[int]]:
        words = [rng.choice(self.names) for _ in range(rng.randint(1, 3))]
        if kind is None:
            return words, [0] * len(words)
        begin, inside = self.label_index[f"B-{kind}"], self.label_index[f"I-{kind}"]
        return words, [begin] + [inside] * (len(words) - 1)

    def _segment(self, rng: random.Random) -> Tuple[List[int], List[int]]:
        """One mention (or a lone word) followed by one filler word."""
        roll = rng.random()
        if roll < 0.40:
            words, tags = [], []
        elif roll < 0.52:
            span, span_tags = self._span(rng, "PER")
            words, tags = [rng.choice(self.titles)] + span, [0] + span_tags
        elif roll < 0.64:
            span, span_tags = self._span(rng, "LOC")
            words, tags = [rng.choice(self.prepositions)] + span, [0] + span_tags
        elif roll < 0.76:
            span, span_tags = self._span(rng, "ORG")
            words, tags = span + [rng.choice(self.suffixes)], span_tags + [0]
        elif roll < 0.90:
            words, tags = self._span(rng, None)
        else:
            words, tags = [rng.choice(self.titles + self.prepositions + self.suffixes)], [0]
        return words + [rng.choice(self.fillers)], tags + [0]

    def sentence(self, rng: random.Random) -> Tuple[List[int], List[int]]:
        length = rng.randint(self.min_len, self.max_len)
        words: List[int] = []
        tags: List[int] = []
        while True:
            seg_words, seg_tags = self._segment(rng)
            if len(words) + len(seg_words) > length:
                break
            words += seg_words
            tags += seg_tags
        while len(words) < length:  # top up with fillers rather than cut a mention
            words.append(rng.choice(self.fillers))
            tags.append(0)
        return words, tags

    def batch(self, rng: random.Random, size: int, pad_to: Optional[int] = None) -> Batch:
        sentences = [self.sentence(rng) for _ in range(size)]
        width = pad_to or max(len(words) for words, _ in sentences)
        tokens = torch.full((size, width), self.PAD, dtype=torch.long)
        tags = torch.zeros((size, width), dtype=torch.long)
        for row, (words, labels) in enumerate(sentences):
            tokens[row, :len(words)] = torch.tensor(words)
            tags[row, :len(labels)] = torch.tensor(labels)
        lengths = torch.tensor([len(words) for words, _ in sentences], dtype=torch.long)
        return Batch(tokens, tags, lengths)

    def batches(self, seed: int, count: int, size: int, pad_to: Optional[int] = None) -> List[Batch]:
        """`count` batches, the same for the same seed."""
        rng = random.Random(seed)
        return [self.batch(rng, size, pad_to) for _ in range(count)]


# --------------------------------------------------------------------------- evaluation

def spans(tags: Sequence[int]) -> Set[Tuple[int, int, str]]:
    """(start, end exclusive, type) of each BIO span; an I-X that does not
    continue an X span opens one, as conlleval reads it."""
    found: Set[Tuple[int, int, str]] = set()
    start, kind = None, None
    for i, tag in enumerate(list(tags) + [0]):
        label = LABELS[tag]
        prefix, _, label_kind = label.partition("-")
        if kind is not None and not (prefix == "I" and label_kind == kind):
            found.add((start, i, kind))
            start, kind = None, None
        if prefix == "B" or (prefix == "I" and kind is None):
            start, kind = i, label_kind
    return found


def span_f1(gold: Sequence[Sequence[int]], predicted: Sequence[Sequence[int]]) -> Tuple[float, float, float]:
    """Micro precision, recall and F1 over exact (start, end, type) matches."""
    hits = n_gold = n_pred = 0
    for gold_tags, pred_tags in zip(gold, predicted):
        g, p = spans(gold_tags), spans(pred_tags)
        hits += len(g & p)
        n_gold += len(g)
        n_pred += len(p)
    precision = hits / n_pred if n_pred else 0.0
    recall = hits / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


@torch.no_grad()
def evaluate(model: "Tagger", batches: Sequence[Batch]) -> Tuple[float, float]:
    """(Mean negative log-likelihood per sentence, span F1 of the Viterbi paths)."""
    was_training = model.training
    model.eval()
    gold: List[List[int]] = []
    predicted: List[List[int]] = []
    loss = 0.0
    for batch in batches:
        loss += float(model(batch.tokens, batch.tags, batch.lengths)) * batch.tokens.size(0)
        predicted += model.decode(batch.tokens, batch.lengths)
        gold += [row[:n].tolist() for row, n in zip(batch.tags, batch.lengths.tolist())]
    model.train(was_training)
    return loss / max(1, len(gold)), span_f1(gold, predicted)[2]


# --------------------------------------------------------------------------- models

class Embedder(nn.Module):
    """Word embeddings: the first stage of the plain BiLSTM-CRF."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=TaggingTask.PAD)
        self.dim = dim

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.embedding(tokens)


class Tagger(nn.Module):
    """encoder -> BiLSTM -> linear -> CRF.

    `forward(tokens, tags, lengths)` is the training loss, the negative
    log-likelihood averaged over the sequences (so that data-parallel
    averaging of gradients gives the gradient of the global batch's mean).
    With `packed=True` the BiLSTM reads a PackedSequence, as a real tagger
    should (the backward direction then starts at each sentence's last word,
    not at the padding).
    """

    def __init__(self, encoder: nn.Module, features: int, hidden: int, num_tags: int,
                 lstm_cls: Callable[..., nn.Module], crf: nn.Module, packed: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.lstm = lstm_cls(features, hidden, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(2 * hidden, num_tags)
        self.crf = crf
        self.packed = packed

    def emissions(self, tokens: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        positions = torch.arange(tokens.size(1), device=tokens.device)
        mask = positions.unsqueeze(0) < lengths.to(tokens.device).unsqueeze(1)
        features = self.encoder(tokens, mask)
        if self.packed:
            packed = pack_padded_sequence(features, lengths.cpu(), batch_first=True, enforce_sorted=False)
            hidden, _ = self.lstm(packed)
            hidden, _ = pad_packed_sequence(hidden, batch_first=True, total_length=tokens.size(1))
        else:
            hidden, _ = self.lstm(features)
        return self.proj(hidden), mask

    def forward(self, tokens: Tensor, tags: Tensor, lengths: Tensor) -> Tensor:
        emissions, mask = self.emissions(tokens, lengths)
        return -self.crf(emissions, tags, mask, reduction="mean")

    def decode(self, tokens: Tensor, lengths: Tensor) -> List[List[int]]:
        emissions, mask = self.emissions(tokens, lengths)
        return self.crf.decode(emissions, mask)


def layer_classes(kind: str, constrained: bool = True):
    """(LSTM class, CRF factory) for kind "fastnlp" or "torch" (nn.LSTM + pytorch-crf).

    pytorch-crf has no transition constraints, so only the fastnlp CRF gets
    the BIO ones; `constrained=False` leaves them out too, which makes the two
    CRFs the same function.
    """
    if kind == "fastnlp":
        import fastnlp
        constraints = fastnlp.nn.allowed_transitions("BIO", LABELS) if constrained else None
        return fastnlp.nn.LSTM, lambda: fastnlp.nn.CRF(len(LABELS), batch_first=True, constraints=constraints)
    if kind == "torch":
        import torchcrf
        return nn.LSTM, lambda: torchcrf.CRF(len(LABELS), batch_first=True)
    raise ValueError(f"kind must be 'fastnlp' or 'torch', got {kind!r}")


def bilstm_crf(task: TaggingTask, kind: str, embed_dim: int = 64, hidden: int = 128,
               packed: bool = True, constrained: bool = True) -> Tagger:
    """The plain tagger: embeddings -> BiLSTM -> CRF."""
    lstm_cls, make_crf = layer_classes(kind, constrained)
    return Tagger(Embedder(task.vocab_size, embed_dim), embed_dim, hidden, len(LABELS), lstm_cls, make_crf(),
                  packed=packed)


def make_twins(build: Callable[[str], nn.Module], seed: int) -> Tuple[nn.Module, nn.Module]:
    """The same model built from fastnlp layers and from torch / pytorch-crf
    layers, the second loaded with the first's weights (the state_dict keys
    are the same by design)."""
    torch.manual_seed(seed)
    ours = build("fastnlp")
    theirs = build("torch")
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


# --------------------------------------------------------------------------- training

@dataclass
class TrainResult:
    losses: List[float] = field(default_factory=list)
    checkpoints: List[Dict[str, float]] = field(default_factory=list)  # step, loss, f1
    seconds: float = 0.0   # training steps only, warm-up and evaluation excluded
    tokens: int = 0        # real (unpadded) tokens in the timed steps

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


class _Trainee:
    """One model being trained: its loss function, optimizer and figures."""

    def __init__(self, model: nn.Module, loss_fn: Optional[Callable[..., Tensor]], lr: float) -> None:
        self.model = model
        self.loss_fn = model if loss_fn is None else loss_fn
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.result = TrainResult()

    def step(self, batch: Batch, timed: bool) -> None:
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(batch.tokens, batch.tags, batch.lengths)
        loss.backward()
        self.optimizer.step()
        elapsed = time.perf_counter() - start
        self.result.losses.append(loss.item())
        if timed:
            self.result.seconds += elapsed
            self.result.tokens += batch.num_tokens


WARMUP_STEPS = 2  # untimed: a compiled model compiles in them


def train(model: nn.Module, batches: Sequence[Batch], lr: float = 5e-3, *,
          loss_fn: Optional[Callable[..., Tensor]] = None, eval_batches: Sequence[Batch] = (),
          evaluations: int = 4, warmup: int = WARMUP_STEPS, baseline: Optional[nn.Module] = None,
          desc: str = "train", progress: bool = True) -> Tuple[TrainResult, Optional[TrainResult]]:
    """Adam on `batches`, one step each.

    Evaluates loss and span F1 on `eval_batches` at step 0 and `evaluations`
    times evenly spread to the end. A `baseline` model, if given, takes the
    same steps interleaved with the model's (in alternating order), so that
    the load of a shared machine weighs on both timings alike; it is not
    evaluated. The first `warmup` steps (where a compiled model compiles) and
    the evaluations are not timed. Returns the model's and the baseline's figures.
    """
    trainees = [_Trainee(model, loss_fn, lr)] + ([_Trainee(baseline, None, lr)] if baseline is not None else [])
    ours = trainees[0].result
    steps = len(batches)
    eval_steps = {round(steps * i / evaluations) for i in range(1, evaluations + 1)} if evaluations else {steps}
    bar = tqdm(total=steps, desc=desc, unit="step", leave=False) if progress and tqdm else None
    say = bar.write if bar is not None else print

    def checkpoint(step: int) -> None:
        loss, f1 = evaluate(model, eval_batches)
        ours.checkpoints.append({"step": step, "loss": loss, "f1": f1})
        say(f"  step {step:5d}  held-out loss {loss:8.3f}  span F1 {f1:.3f}")

    if eval_batches:
        checkpoint(0)
    for trainee in trainees:
        trainee.model.train()
    for step, batch in enumerate(batches, start=1):
        for trainee in (trainees if step % 2 else trainees[::-1]):
            trainee.step(batch, timed=step > warmup)
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{ours.losses[-1]:.3f}")
        if eval_batches and step in eval_steps:
            checkpoint(step)
    if bar is not None:
        bar.close()
    return ours, (trainees[1].result if baseline is not None else None)


# --------------------------------------------------------------------------- the examples' command line

def _timed_steps(text: str) -> int:
    """--steps: at least one step past the untimed warm-up, or there is no speed to report."""
    steps = int(text)
    if steps <= WARMUP_STEPS:
        raise argparse.ArgumentTypeError(f"must be more than {WARMUP_STEPS}, the untimed warm-up steps; got {steps}")
    return steps


def add_arguments(parser, steps: int, batch_size: int) -> None:
    parser.add_argument("--steps", type=_timed_steps, default=steps,
                        help=f"training steps (one batch each), more than the {WARMUP_STEPS} untimed warm-up ones")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--eval-sentences", type=int, default=256, help="size of the held-out set")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true",
                        help="train torch.compile(model, fullgraph=True); implies --padded (TorchDynamo "
                             "does not trace pack_padded_sequence). The baseline stays eager: TorchDynamo "
                             "graph-breaks on nn.LSTM")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--padded", action="store_true",
                        help="feed the BiLSTMs padded batches (all of the same width) instead of "
                             "packed sequences")
    parser.add_argument("--no-baseline", action="store_true", help="skip timing the torch / pytorch-crf twin")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args, build: Callable[[TaggingTask, str, bool], nn.Module], title: str, baseline_name: str) -> Dict:
    """Train the fastnlp model and, step by step interleaved with it, its
    baseline twin on the same batches; report loss / F1 / tokens/s and the
    speed-up. Returns the figures (for tests)."""
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, build, title, baseline_name)
    finally:  # called in process (by the tests), leave the thread count as it was
        torch.set_num_threads(threads)


def _run(args, build: Callable[[TaggingTask, str, bool], nn.Module], title: str, baseline_name: str) -> Dict:
    wall = time.perf_counter()
    task = TaggingTask()
    # Padded batches all have the same width, so that one compiled graph serves them all.
    packed = not (args.padded or args.compile)
    pad_to = None if packed else task.max_len
    train_batches = task.batches(args.seed, args.steps, args.batch_size, pad_to)
    eval_batches = task.batches(args.seed + 10_000, max(1, -(-args.eval_sentences // args.batch_size)),
                                args.batch_size, pad_to)
    ours, theirs = make_twins(lambda kind: build(task, kind, packed), args.seed)
    parameters = sum(p.numel() for p in ours.parameters())
    print(f"{title}: {parameters:,} parameters, {len(LABELS)} BIO tags, {args.steps} steps of "
          f"{args.batch_size} sentences, {torch.get_num_threads()} threads"
          f"{', compiled (fullgraph)' if args.compile else ''}{', packed' if packed else ', padded'}")
    loss_fn = torch.compile(ours, fullgraph=True, backend=args.compile_backend) if args.compile else ours
    desc = "fastnlp" if args.no_baseline else f"fastnlp and {baseline_name}, interleaved"
    ours_result, theirs_result = train(ours, train_batches, args.lr, loss_fn=loss_fn, eval_batches=eval_batches,
                                       baseline=None if args.no_baseline else theirs, desc=desc,
                                       progress=not args.no_progress)
    first, last = ours_result.checkpoints[0], ours_result.checkpoints[-1]
    print(f"fastnlp:  held-out loss {first['loss']:.2f} -> {last['loss']:.3f}, span F1 {first['f1']:.3f} -> "
          f"{last['f1']:.3f}; {ours_result.tokens_per_second:,.0f} tokens/s")
    figures = {"losses": ours_result.losses, "checkpoints": ours_result.checkpoints,
               "tokens_per_second": ours_result.tokens_per_second}
    if theirs_result is not None:
        speedup = theirs_result.seconds / ours_result.seconds if ours_result.seconds else float("nan")
        print(f"baseline ({baseline_name}): {theirs_result.tokens_per_second:,.0f} tokens/s; "
              f"final training loss {theirs_result.losses[-1]:.3f} (fastnlp {ours_result.losses[-1]:.3f})")
        print(f"speed-up of fastnlp: {speedup:.2f}x")
        figures.update(baseline_tokens_per_second=theirs_result.tokens_per_second, speedup=speedup,
                       baseline_losses=theirs_result.losses)
    figures["wall_seconds"] = time.perf_counter() - wall
    print(f"total {figures['wall_seconds']:.1f} s")
    return figures
