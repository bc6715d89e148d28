"""The MDLM loss's -log p(label) by `loss_triton`'s two kernels, against `diffusion.token_nll` (its reference) and
autograd through it, on the CPU under Triton's interpreter (TRITON_INTERPRET=1)."""

import pytest
import torch

from diffuapriel_hf.modeling.diffusion import token_nll

pytest.importorskip("triton")

from diffuapriel_hf.modeling.loss_triton import (BLOCK_V, launch_token_nll,  # noqa: E402 (needs triton)
                                                 launch_token_nll_backward)

# (rows, vocabulary, mask token, padded width or None, dtype): several blocks with a partial last one, the mask token
# first, last and inside; a strided view of a padded product (as the LM head's slice); bf16 logits.
CASES = [
    (5, 2 * BLOCK_V + 37, 3, None, torch.float32),
    (4, 100, 0, None, torch.float32),
    (3, BLOCK_V + 1, BLOCK_V, BLOCK_V + 8, torch.float32),
    (6, 300, 299, 304, torch.bfloat16),
]


def case_inputs(rows, vocab, mask_token_id, padded, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    width = padded or vocab
    logits = (3 * torch.randn(rows, width, generator=g)).to(dtype)[:, :vocab]
    labels = torch.randint(0, vocab - 1, (rows,), generator=g)
    labels[labels >= mask_token_id] += 1  # every token but the mask
    labels[1] = -100
    return logits, labels, torch.randn(rows, generator=g)


def interpreted_checks() -> dict:
    """Run every case in this process (which must have TRITON_INTERPRET=1 set before triton was first imported)."""
    torch.set_num_threads(1)
    errors = {}
    for index, case in enumerate(CASES):
        logits, labels, upstream = case_inputs(*case, seed=index)
        mask_token_id = case[2]
        nll, logsumexp = launch_token_nll(logits, labels, mask_token_id)
        reference_logits = logits.detach().clone().requires_grad_(True)
        expected = token_nll(reference_logits, labels, mask_token_id)
        (expected * upstream).sum().backward()
        grad = launch_token_nll_backward(logits, labels, logsumexp, upstream, mask_token_id)
        errors[str(index)] = dict(
            nll=(nll - expected.detach()).abs().max().item(),
            grad=(grad.float() - reference_logits.grad.float()).abs().max().item(),
            grad_dtype=str(grad.dtype), unlabelled_nll=nll[1].item(), unlabelled_grad=grad[1].abs().max().item(),
            mask_token_grad=grad[:, mask_token_id].abs().max().item(),
        )
    return errors


@pytest.mark.parametrize("case", [str(index) for index in range(len(CASES))])
def test_interpreted_token_nll_matches_the_reference_and_its_gradient(interpreted, case):
    errors = interpreted[case]
    bf16 = CASES[int(case)][4] == torch.bfloat16
    assert errors["nll"] <= 1e-5 * 50
    assert errors["grad"] <= (2**-7 if bf16 else 1e-6)  # bf16: one rounding of float32 gradients up to 2 apart
    assert errors["grad_dtype"] == str(CASES[int(case)][4])
    assert errors["unlabelled_nll"] == 0 and errors["unlabelled_grad"] == 0 and errors["mask_token_grad"] == 0
