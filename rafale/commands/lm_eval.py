"""`rafale lm-eval`: EleutherAI's lm-evaluation-harness run directly on a rafale decoder, no conversion.

    rafale lm-eval runs/pythia-tiny-stories --tasks my_task --include-path my_tasks/
    rafale lm-eval runs/pythia-tiny-stories/export --tasks hellaswag,lambada_openai    (online: hub datasets)

`RafaleLM` implements lm-eval's `LM` interface (loglikelihood, loglikelihood_rolling, generate_until) on
rafale's decoders (GPT-NeoX, Llama, Qwen2, Qwen3) and their tokenizer. It tokenizes as lm-eval's Hugging Face model
does (`HFLM`), so the scores equal those of HFLM on the exported weights (tested). Needs the optional extra: pip install 'rafale[lm-eval]'.
"""

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from rafale.errors import RafaleError
from rafale.data.tokenizers import special_token_ids

try:
    from lm_eval.api.model import LM
except ImportError:  # the optional extra is not installed: the class is still importable, the command says why
    LM = object


class RafaleLM(LM):
    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or model.cfg.max_position_embeddings
        self.eot_token_id, self.pad_token_id = special_token_ids(tokenizer, "tokenizer")

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """As HFLM: trailing spaces of the context move to the continuation; the pair is split after encoding
        the whole, so a token straddling the boundary belongs to the continuation."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        context_ids = self.tok_encode(context)
        return context_ids, whole[len(context_ids):]

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each continuation given its context, and whether it is the greedy one."""
        results = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for ctx, cont in chunk]
            T = max(len(x) for x in inputs)
            input_ids = torch.full((len(inputs), T), self.pad_token_id, dtype=torch.long)
            for row, ids in enumerate(inputs):  # right padding: causal attention never looks ahead at it
                input_ids[row, : len(ids)] = torch.tensor(ids)
            log_probs = F.log_softmax(self.model(input_ids).float(), dim=-1)  # (B, T, V)
            for row, ((_, cont), ids) in enumerate(zip(chunk, inputs)):
                positions = torch.arange(len(ids) - len(cont), len(ids))
                target = torch.tensor(cont)
                rows = log_probs[row, positions]  # (len(cont), V)
                logprob = rows.gather(-1, target[:, None]).sum().item()
                results.append((logprob, bool((rows.argmax(-1) == target).all())))
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            context, continuation = request.args
            if context == "":
                pairs.append(([self.eot_token_id], self.tok_encode(continuation)))
            else:
                pairs.append(self.encode_pair(context, continuation))
        return self.score(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        totals = []
        for request in requests:
            (text,) = request.args
            windows = [
                make_disjoint_window(window)
                for window in get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.eot_token_id,
                    max_seq_len=self.max_length, context_len=1,
                )
            ]
            totals.append(sum(logprob for logprob, _ in self.score(windows)))
            self.rolling_nats -= totals[-1]
            self.rolling_bytes += len(text.encode("utf-8"))
        return totals

    # every rolling log-likelihood scored so far, for bits per byte (comparable across tokenizers)
    rolling_nats = 0.0
    rolling_bytes = 0

    def rolling_bits_per_byte(self) -> float | None:
        """-sum(log-likelihood) / (ln 2 x UTF-8 bytes) over the documents scored by loglikelihood_rolling."""
        return self.rolling_nats / (math.log(2) * self.rolling_bytes) if self.rolling_bytes else None

    noted_gen_cap = False  # whether the cap on max_gen_toks was already printed

    def generation_settings(self, gen_kwargs: dict) -> dict:
        """lm-eval's generation arguments as rafale's generate() takes them; an argument it cannot honour is an
        error rather than silently ignored. max_gen_toks is capped below the model's context (noted once)."""
        from lm_eval.models.utils import normalize_gen_kwargs

        kwargs = dict(normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=256))
        until, max_new = kwargs.pop("until"), kwargs.pop("max_gen_toks")
        do_sample, temperature = kwargs.pop("do_sample"), float(kwargs.pop("temperature", 0.0))
        top_k, top_p, seed = kwargs.pop("top_k", None), kwargs.pop("top_p", None), kwargs.pop("seed", None)
        if kwargs:
            raise RafaleError(f"lm-eval generation arguments {sorted(kwargs)} are not supported by rafale's generate; "
                              "supported: until, max_gen_toks, do_sample, temperature, top_k, top_p, seed")
        if max_new >= self.max_length:
            if not self.noted_gen_cap:
                print(f"rafale: lm-eval asks for max_gen_toks {max_new}, not below the model's context of "
                      f"{self.max_length} tokens; generating at most {self.max_length - 1} (one token of context)")
                self.noted_gen_cap = True
            max_new = self.max_length - 1
        if not do_sample:
            temperature, top_k, top_p = 0.0, None, None  # greedy, as HF's generate with do_sample=False
        elif temperature == 0.0:
            temperature = 1.0  # sampling without a temperature: HF's default
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        return {"until": [until] if isinstance(until, str) else list(until), "max_new_tokens": max_new,
                "temperature": temperature, "top_k": top_k, "top_p": top_p, "generator": generator}

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            settings = self.generation_settings(gen_kwargs)
            until, max_new = settings.pop("until"), settings.pop("max_new_tokens")
            ids = self.tok_encode(context)
            keep = self.max_length - max_new  # >= 1: the last tokens of the context, so that it and the continuation fit
            ids = ids[max(0, len(ids) - keep):] or [self.eot_token_id]
            tokens = self.model.generate(torch.tensor([ids]), max_new, eos_token_id=self.eot_token_id, **settings)
            new = [t for t in tokens[0, len(ids):].tolist() if t != self.eot_token_id]
            text = self.tokenizer.decode(new)
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs


def lm_eval_main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="rafale lm-eval", description="Score a decoder with lm-evaluation-harness.",
        epilog="example: rafale lm-eval runs/pythia-tiny-stories --tasks mytask --include-path tasks/ --limit 100")
    parser.add_argument("model", help="a run folder (its latest checkpoint) or a Hugging Face model folder")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--include-path", help="a folder of task YAML files (local tasks)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--out", help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise RafaleError("rafale lm-eval needs lm-evaluation-harness: pip install 'rafale[lm-eval]'") from None
    from rafale.commands.generate import load_decoder

    model, tokenizer = load_decoder(Path(args.model).expanduser())
    task_manager = TaskManager(include_path=args.include_path) if args.include_path else TaskManager()
    lm = RafaleLM(model, tokenizer, batch_size=args.batch_size)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=args.tasks.split(","),
        task_manager=task_manager,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
    )
    for task, metrics in results["results"].items():
        shown = ", ".join(f"{k}: {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"rafale: {task}: {shown}")
    bits_per_byte = lm.rolling_bits_per_byte()
    if bits_per_byte is not None:  # loglikelihood_rolling tasks (perplexity of whole documents)
        print(f"rafale: rolling log-likelihood of {lm.rolling_bytes:,} bytes: {bits_per_byte:.4f} bits per byte")
        results["results"]["rafale_rolling"] = {"bits_per_byte": bits_per_byte, "bytes": lm.rolling_bytes}
    if args.out:
        Path(args.out).write_text(json.dumps(results["results"], indent=2, default=str))
    return 0
