"""``quietstar generate``: continue a prompt, thinking before every token, printed as it comes.

Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from quietstar.utils.settings import add_dataclass_arguments, field_docs, option
from quietstar.method.config import check_thought_settings
from quietstar.cli.common import LoadingArguments, check_at_least, check_device, command_main, parse_settings
from quietstar.utils.errors import QuietStarInputError

if TYPE_CHECKING:
    import torch

HELP = "generate text, thinking before every token"


@dataclass
class GenerateArguments:
    """The settings of ``quietstar generate``."""

    model: str
    """a saved QuietStar model folder or Hub repo, or a base model (folder, hub id or
    embedded:smollm2-135m-instruct), wrapped untrained"""
    prompt: str
    """the text to continue"""
    max_new_tokens: int = 64
    """tokens to generate at most"""
    thought_tokens: int | None = option(None, shown_default="the model's sampled_thought_tokens")
    """tokens per thought, 0 = no thinking"""
    thought_temperature: float | None = option(None, shown_default="the model's thought_temperature")
    """temperature of thought tokens, 0 = greedy"""
    thought_threshold: float = 0.0
    """think only before tokens whose base prediction has an entropy above this (nats); 0 = before
    every token"""
    show_thoughts: bool = False
    """print each token's thought before it (tokens that did not think are printed plain)"""
    color: Literal["auto", "always", "never"] = "auto"
    """show thoughts dimmed (ANSI) or between « »; auto: dimmed on a terminal"""
    sample: bool = False
    """sample the next token; --greedy (the default) picks the most likely one"""
    temperature: float = 1.0
    """token sampling temperature, with --sample"""
    top_k: int | None = option(None, shown_default="no top-k cut")
    """sample from the k most likely tokens only, with --sample"""
    top_p: float | None = option(None, shown_default="no nucleus cut")
    """sample from the most likely tokens whose probabilities reach p, with --sample"""
    seed: int | None = option(None, shown_default="unseeded")
    """random seed for sampling"""
    device: str | None = option(None, shown_default="cuda when available, else cpu")
    """e.g. cpu, cuda"""
    allow_position_extrapolation: bool | None = option(None,
                                                       shown_default="the model's allow_position_extrapolation")
    """let a rotary model generate past its max_position_embeddings, where it was never trained
    (refused otherwise)"""

    def __post_init__(self):
        if not self.prompt:
            raise QuietStarInputError("--prompt is empty; give a text to continue")
        check_thought_settings(self.thought_tokens, self.thought_temperature)
        check_device(self.device)
        check_at_least(1, max_new_tokens=self.max_new_tokens)
        if not (math.isfinite(self.thought_threshold) and self.thought_threshold >= 0):
            raise QuietStarInputError(f"--thought-threshold must be a finite number >= 0 (0 = think before every "
                                      f"token), got {self.thought_threshold}")
        if not self.sample and (self.top_k is not None or self.top_p is not None
                                or self.temperature != 1.0):
            raise QuietStarInputError("--temperature/--top-k/--top-p need --sample")


DIM, RESET = "\x1b[2m", "\x1b[0m"


class TextStreamer:
    """Prints the continuation as it is generated (the prompt is not echoed)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.printed = 0  # characters of the decoded continuation already written
        self.prompt_seen = False

    @staticmethod
    def _write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def put(self, token_ids: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.tokens.extend(token_ids.view(-1).tolist())
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for the rest
        self._write(text[self.printed:])
        self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        self._write(text[self.printed:] + "\n")


class ThoughtStreamer(TextStreamer):
    """Prints the continuation with each token's thought just before the token: dimmed (ANSI)
    when ``color`` is true, else between « and »."""

    def __init__(self, tokenizer, color: bool):
        super().__init__(tokenizer)
        self.color = color

    def put_thought(self, thought_ids: torch.Tensor) -> None:
        text = self.tokenizer.decode(thought_ids.tolist()).replace("\n", "\\n")
        self._write(f"{DIM}{text}{RESET}" if self.color else f"«{text}»")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every GenerateArguments field."""
    add_dataclass_arguments(parser, GenerateArguments, exclude=("sample",))
    add_dataclass_arguments(parser, LoadingArguments, title="model loading")
    # By hand: one bool, two opposite flags that exclude each other (--greedy is --no-sample).
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--greedy", dest="sample", action="store_false", default=argparse.SUPPRESS,
                      help="pick the most likely token (the default)")
    mode.add_argument("--sample", dest="sample", action="store_true", default=argparse.SUPPRESS,
                      help=field_docs(GenerateArguments)["sample"])


def run(args: argparse.Namespace) -> int:
    settings = parse_settings(GenerateArguments, args)
    loading = parse_settings(LoadingArguments, args)
    check_length(settings, loading)
    # Here, after the flags are checked: torch and transformers, which --help and a wrong flag
    # must not wait for.
    import torch

    from quietstar.method.generation import generate
    from quietstar.utils.batching import model_device

    device = settings.device
    if device is None and loading.device_map is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = loading.load(settings.model, device)
    device = model_device(model)  # where --device or --device-map put it
    if settings.show_thoughts:
        color = settings.color == "always" or (settings.color == "auto" and sys.stdout.isatty())
        streamer = ThoughtStreamer(model.tokenizer, color)
    else:
        streamer = TextStreamer(model.tokenizer)
    input_ids = model.tokenizer(settings.prompt, return_tensors="pt").input_ids.to(device)
    if input_ids.shape[1] == 0:
        raise QuietStarInputError(f"--prompt {settings.prompt!r} encodes to no token; give a text to continue")
    generator = None
    if settings.seed is not None:
        generator = torch.Generator(device=device).manual_seed(settings.seed)
    generate(model, input_ids, max_new_tokens=settings.max_new_tokens, do_sample=settings.sample,
             temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
             streamer=streamer, thought_temperature=settings.thought_temperature,
             thought_tokens=settings.thought_tokens, thought_threshold=settings.thought_threshold,
             generator=generator, allow_position_extrapolation=settings.allow_position_extrapolation)
    return 0


def check_length(settings: GenerateArguments, loading: LoadingArguments) -> None:
    """--max-new-tokens, the thought length and the thought_prefix's tokens against the model's
    positions, from its config files (and, for a prefix, its tokenizer) alone, before the weights
    load (a prompt has one token at least; ``generate`` checks again with its length), by the
    rule ``generate`` checks with (``generation_positions``). Skipped where the configs cannot be
    read without loading; the prefix counted where the tokenizer can."""
    from quietstar.method.generation import generation_positions  # torch: not for --help
    from quietstar.models.limits import check_positions
    from quietstar.models.loading import read_model_config, read_quietstar_config, read_quietstar_tokenizer

    where = dict(revision=loading.revision, cache_dir=loading.cache_dir)
    lm_config = read_model_config(settings.model, **where)
    method = None if lm_config is None else read_quietstar_config(settings.model, **where)
    if method is None:
        return
    N = settings.max_new_tokens
    k, _ = method.thought_settings(settings.thought_tokens, None)
    m = 0
    if k and method.thought_prefix:  # its tokens, as the model counts them (QuietStarConfig.thought_prefix_ids)
        tokenizer = read_quietstar_tokenizer(settings.model, **where)
        m = 0 if tokenizer is None else len(method.thought_prefix_ids(tokenizer))
    what = f"generating {N} tokens" + (f" (thoughts of {k} tokens after a {m}-token thought_prefix)" if m else "")
    allow = settings.allow_position_extrapolation
    check_positions(lm_config, generation_positions(1, N, k, prefix_tokens=m), what,
                    method.allow_position_extrapolation if allow is None else allow)


def main(argv: list[str] | None = None) -> int:
    """``quietstar generate ...`` from Python (``argv`` without the command name)."""
    return command_main("generate", argv)

