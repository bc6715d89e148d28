"""generate() on a model compiled in place (`model.compile()`): every denoising pass runs the graph torch.compile
captured, and the tokens are the eager model's."""

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


class CountingBackend:
    """A torch.compile backend that runs each captured graph as captured (no code generation, so the test is quick)
    and counts the graphs and their calls: a pass that ran eagerly, or in pieces between graph breaks, shows."""

    def __init__(self):
        self.graphs = self.calls = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1

        def run(*args):
            self.calls += 1
            return graph_module(*args)

        return run


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("block_size", [None, 4], ids=["full-sequence", "block-model"])
def test_generate_on_a_compiled_model_runs_every_pass_compiled(tiny_model, fresh_dynamo, block_size):
    # Mamba and attention layers, a left-padded batch, 12 new tokens in blocks of 8 and 4 (the full-sequence model)
    # or the block model's own blocks of 4 with its exact cache.
    model = tiny_model("hybrid", sharpen=4.0, block_size=block_size)
    ids = torch.randint(3, model.config.mask_token_id, (2, 6))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :2] = 0
    settings = dict(attention_mask=attention_mask, max_new_tokens=12, steps=6, return_dict_in_generate=True,
                    block_length=None if block_size else 8)
    model_calls = []
    hook = model.register_forward_pre_hook(lambda module, args: model_calls.append(1))
    eager = model.generate(ids, **settings)
    hook.remove()
    backend = CountingBackend()
    model.compile(backend=backend)
    compiled = model.generate(ids, **settings)
    assert torch.equal(compiled.sequences, eager.sequences)
    # Each call of the model (every denoising pass, and a block model's passes that consume committed blocks into its
    # cache) is one call of a compiled graph: none ran eagerly, none was cut by a graph break; and the calls reuse the
    # graphs, one per input shape (the window's two lengths; the cache's prefill, step and consume passes).
    assert compiled.num_forward_passes == eager.num_forward_passes <= len(model_calls) == backend.calls
    assert 1 <= backend.graphs <= 3
