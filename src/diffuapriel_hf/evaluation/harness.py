"""DiffuApriel in EleutherAI's lm-evaluation-harness: the model `diffuapriel`, registered with lm-eval when this module
is imported (`diffuapriel eval` imports it, then runs lm-eval's own command line).

- `loglikelihood`: the conditional likelihood (`model.compute_conditional_elbo`): the negative ELBO of the
  continuation given the context, which is never noised, so a log-likelihood is reported as its lower bound -NELBO;
  `is_greedy` says whether greedy diffusion decoding of the masked continuation, one token per step with the most
  confident first, writes it (`likelihood.greedy_reproduces`).
- `loglikelihood_rolling`: the document in windows of `max_length` tokens, each scored alone by `compute_elbo`'s bound
  (the time grid; a diffusion model needs no token before a window to start from).
- `generate_until`: `model.generate()` with the task's stop strings (checked as each block is committed, the text cut
  at the first) and `max_gen_toks` as `max_new_tokens`; `steps`, `block_length` and the other generation settings come
  from the model's generation config or from `--model_args`.

Data-parallel under `accelerate launch` as lm-eval's `hf` model is: each process loads the model on its device and
lm-eval gives it every `world_size`-th request. Every request draws its masks from its own seeded generator, so a
score does not depend on the batch, the process or how many there are.

The `hf` model must not be used: it loads `AutoModelForCausalLM` (DiffuApriel is not one) and, handed the model
object, scores a bidirectional denoiser as a left-to-right model: chance-level accuracy, no valid perplexity.
"""

import os

import torch
from accelerate import Accelerator
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm
from transformers import AutoTokenizer

from ..modeling.likelihood import conditional_negative_elbo, greedy_reproduces
from ..modeling.modeling_diffuapriel import DiffuAprielForMaskedLM
from ..shipped import default_model_path

__all__ = ["DiffuAprielLM", "fit"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What lm-eval's command line passes to every model; `max_batch_size` only matters to batch_size="auto".
HARNESS_ARGUMENTS = ("max_batch_size",)


def fit(context: list, continuation: list, max_length: int) -> tuple[list, list]:
    """(context, continuation) cut to `max_length` tokens together: the context's first tokens go first, then the
    continuation's."""
    continuation = continuation[-max_length:]
    keep = max_length - len(continuation)
    return context[len(context) - keep :] if keep else [], continuation


@register_model("diffuapriel")
class DiffuAprielLM(TemplateLM):
    """lm-eval's model `diffuapriel` (`--model_args pretrained=FOLDER_OR_HUB_ID,...`).

    pretrained: a saved DiffuApriel folder or Hub id (default: the model shipped in the package); dtype: float32
    (default), bfloat16 or float16; device: default CUDA when there is one, else the CPU, also for a CUDA device where
    there is none, as lm-eval's `hf` model does (under `accelerate launch`, each process's own); batch_size: rows per forward pass; max_length: the longest sequence scored or generated
    (default: the config's max_position_embeddings); num_samples, estimator, seed: the conditional likelihood's (see
    `modeling/likelihood.py`; `loglikelihood_rolling` always uses the time grid); check_greedy: compute `is_greedy`
    (default True; False reports False without the passes it costs). Any other argument is a generation setting of the
    model's `DiffusionGenerationConfig` (`steps`, `block_length`, `remasking`, `confidence_threshold`, ...), refused by
    name if it is not one; `steps` defaults to one token per step.
    """

    def __init__(self, pretrained=None, dtype="float32", device=None, batch_size=1, max_length=None,
                 num_samples=None, estimator=None, seed=0, check_greedy=True, trust_remote_code=False, **settings):
        super().__init__()
        if str(batch_size).startswith("auto") or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer (no 'auto' for diffuapriel), got {batch_size!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.batch_size = int(batch_size)
        # Launched as several processes (accelerate launch, torchrun): each its share, on its own device; without CUDA
        # the processes run on the CPU and talk through gloo.
        self.accelerator = (Accelerator(cpu=not torch.cuda.is_available())
                            if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)
        if self.accelerator is not None:
            self._device = self.accelerator.device
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        elif device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # lm-eval's command line passes cuda:0 unless told otherwise; as its `hf` model, fall back to the CPU.
            self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self._device = torch.device(device)
        pretrained = pretrained or default_model_path()
        self.model = DiffuAprielForMaskedLM.from_pretrained(pretrained, dtype=DTYPES[dtype]).to(self._device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        self.max_length = int(max_length or self.model.config.max_position_embeddings or 2048)
        self.likelihood = dict(seed=int(seed), **({} if num_samples is None else {"num_samples": int(num_samples)}),
                               **({} if estimator is None else {"estimator": estimator}))
        self.check_greedy = check_greedy in (True, "True", "true", 1)
        self.generation = self._generation_settings(settings)

    def _generation_settings(self, settings: dict) -> dict:
        """The generation settings of `--model_args`: fields of the model's generation config, `steps` unset (one token
        per step) unless given."""
        settings = {key: value for key, value in settings.items() if key not in HARNESS_ARGUMENTS}
        unknown = sorted(key for key in settings if not hasattr(self.model.generation_config, key))
        if unknown:
            raise ValueError(f"model_args {unknown} are neither diffuapriel's arguments nor generation settings of "
                             "the model's DiffusionGenerationConfig")
        return {"steps": None, **settings}

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens)).input_ids

    def all_gather(self, tensor):
        return tensor if self.accelerator is None else self.accelerator.gather(tensor)

    def gather_object(self, obj, dst=0):
        if self.accelerator is None:
            return [obj]
        gathered = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj, gathered, dst=dst)
        return gathered

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def _right_padded(self, rows: list) -> tuple:
        """(input_ids, prompt_mask, attention_mask) of (prompt ids, scored ids) pairs, on the model's device, padded on
        the right (which a block model needs)."""
        width = max(len(prompt) + len(scored) for prompt, scored in rows)
        input_ids = torch.full((len(rows), width), self.model.config.pad_token_id or 0)
        prompt_mask = torch.zeros(len(rows), width, dtype=torch.bool)
        attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
        for row, (prompt, scored) in enumerate(rows):
            input_ids[row, : len(prompt) + len(scored)] = torch.tensor(prompt + scored)
            prompt_mask[row, : len(prompt)] = True
            attention_mask[row, : len(prompt) + len(scored)] = 1
        return input_ids.to(self.device), prompt_mask.to(self.device), attention_mask.to(self.device)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log-likelihood lower bound, is_greedy) of each ((context, continuation), context ids, continuation ids),
        the context cut on the left to fit `max_length` with the continuation."""
        order = Collator(requests, sort_fn=lambda request: (-len(request[1]) - len(request[2]), tuple(request[2])))
        results = []
        with tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="loglikelihood") as progress:
            for batch in order.get_batched(n=self.batch_size):
                rows = [fit(context, continuation, self.max_length) for _, context, continuation in batch]
                inputs = self._right_padded(rows)
                nelbo = conditional_negative_elbo(self.model, *inputs, **self.likelihood)
                greedy = (greedy_reproduces(self.model, *inputs) if self.check_greedy
                          else torch.zeros(len(rows), dtype=torch.bool))
                for (key, _, _), nats, is_greedy in zip(batch, nelbo.nats.tolist(), greedy.tolist()):
                    results.append((-nats, bool(is_greedy)))
                    self.cache_hook.add_partial("loglikelihood", key, results[-1])
                progress.update(len(batch))
        return order.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The lower bound -NELBO of each document: the sum over its windows of `max_length` tokens, each scored alone
        on the time grid (`compute_elbo`'s estimator)."""
        windows, owners = [], []  # (no prompt: each window is scored alone, its tokens), the request it belongs to
        for index, (text,) in enumerate(request.args for request in requests):
            tokens = self.tok_encode(text)
            for start in range(0, len(tokens), self.max_length):
                windows.append(([], tokens[start : start + self.max_length]))
                owners.append(index)
        totals = [0.0] * len(requests)
        settings = dict(self.likelihood, estimator="time_grid")
        for start in tqdm(range(0, len(windows), self.batch_size), disable=disable_tqdm or self.rank != 0,
                          desc="loglikelihood_rolling"):
            inputs = self._right_padded(windows[start : start + self.batch_size])
            nats = conditional_negative_elbo(self.model, *inputs, **settings).nats.tolist()
            for owner, window_nats in zip(owners[start : start + self.batch_size], nats):
                totals[owner] -= window_nats
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """`generate()` on batches of left-padded contexts with the same generation arguments; each text cut at the
        first stop string."""
        order = Collator([request.args for request in requests], sort_fn=lambda args: (-len(self.tok_encode(args[0])),
                         args[0]), group_by="gen_kwargs", group_fn=lambda args: args[1])
        eos = self.tokenizer.decode([self.eot_token_id])
        results = []
        with tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="generate_until") as progress:
            for batch in order.get_batched(n=self.batch_size):
                contexts, all_kwargs = zip(*batch)
                kwargs = normalize_gen_kwargs(all_kwargs[0], 256)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                texts = self._generate(list(contexts), until, kwargs)
                for (context, gen_kwargs), text in zip(batch, texts):
                    results.append(postprocess_generated_text(text, until, None))
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), results[-1])
                progress.update(len(batch))
        return order.get_original(results)

    def _generate(self, contexts: list[str], until: list[str], kwargs: dict) -> list[str]:
        """The new text of each context: left-padded (as `generate()` takes them), cut on the left to leave room for
        `max_gen_toks` within `max_length`."""
        max_new_tokens = int(kwargs.pop("max_gen_toks"))
        if not kwargs.pop("do_sample", False):
            kwargs.pop("temperature", None)  # greedy: lm-eval's temperature 0.0 means no sampling
        else:
            kwargs["do_sample"] = True
        room = max(self.max_length - max_new_tokens, 1)
        encoded = [self.tok_encode(context)[-room:] or [self.prefix_token_id] for context in contexts]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), self.model.config.pad_token_id or 0)
        attention_mask = torch.zeros(len(encoded), width, dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids):], attention_mask[row, width - len(ids):] = torch.tensor(ids), 1
        output = self.model.generate(
            input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
            **{**self.generation, **kwargs}, max_new_tokens=max_new_tokens, stop_strings=until,
            tokenizer=self.tokenizer, seed=self.likelihood["seed"],
        )
        return self.tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
