"""`pipeline("text-generation")` over diffusion `generate()`: from a saved folder (the pipeline's code saved with the
model's), with a model object, batched prompts of several lengths, any number of new tokens, infilling."""

import json

import pytest
from transformers import pipeline

from diffuapriel_hf import DiffusionTextGenerationPipeline
from diffuapriel_hf.modeling.pipeline_diffuapriel import CUSTOM_PIPELINES

pytestmark = pytest.mark.usefixtures("one_thread")

# 20 new tokens in blocks of 8 (8, 8 and 4), sampled: the rows' random streams are part of what must agree.
SETTINGS = dict(max_new_tokens=20, block_length=8, steps=10, do_sample=True, top_k=10, seed=3)
PROMPTS = ["w3 w4 w5", "w7", "w9 w10 w11 w12 w13"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model, word_tokenizer):
    folder = tmp_path_factory.mktemp("generator")
    model = tiny_model("hybrid", sharpen=4.0)
    tokenizer = word_tokenizer(model.config)  # pads on the right: the pipeline pads on the left
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


def generated(model, tokenizer, prompt: str, **settings) -> list[int]:
    return model.generate(tokenizer(prompt, return_tensors="pt").input_ids, **settings)[0].tolist()


def test_a_saved_folder_names_its_pipeline_and_carries_its_code(saved):
    folder = saved[0]
    assert json.loads((folder / "config.json").read_text())["custom_pipelines"] == CUSTOM_PIPELINES
    assert (folder / "pipeline_diffuapriel.py").is_file()


def test_pipeline_from_a_saved_folder_generates_as_generate(saved):
    folder, model, tokenizer = saved
    generator = pipeline("text-generation", model=str(folder), trust_remote_code=True)
    assert type(generator).__name__ == "DiffusionTextGenerationPipeline"
    expected = generated(model, tokenizer, PROMPTS[0], **SETTINGS)
    assert len(expected) == 3 + 20
    assert generator(PROMPTS[0], return_tensors=True, **SETTINGS)[0]["generated_token_ids"] == expected
    text = generator(PROMPTS[0], **SETTINGS)[0]["generated_text"]
    assert text == PROMPTS[0] + tokenizer.decode(expected[3:], skip_special_tokens=True)
    # The folder names one task: pipeline() infers it.
    inferred = pipeline(model=str(folder), trust_remote_code=True)
    assert inferred(PROMPTS[0], return_tensors=True, **SETTINGS)[0]["generated_token_ids"] == expected


def test_a_folder_without_trust_remote_code_is_refused_at_once(saved):
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        pipeline("text-generation", model=str(saved[0]))


def test_pipeline_with_a_model_object(saved):
    _, model, tokenizer = saved
    expected = generated(model, tokenizer, PROMPTS[0], **SETTINGS)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer,
                         pipeline_class=DiffusionTextGenerationPipeline)
    assert generator(PROMPTS[0], return_tensors=True, **SETTINGS)[0]["generated_token_ids"] == expected
    # transformers' own class (a model object names no pipeline) runs the same generate(), after logging that the
    # model is no causal LM, given the settings its own defaults would change (temperature 0.7 in some versions).
    plain = pipeline("text-generation", model=model, tokenizer=tokenizer)
    assert plain(PROMPTS[0], return_tensors=True, temperature=1.0, **SETTINGS)[0]["generated_token_ids"] == expected


def test_a_batch_of_prompts_is_padded_on_the_left_and_each_generates_as_alone(saved):
    _, model, tokenizer = saved
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer,
                         pipeline_class=DiffusionTextGenerationPipeline)
    outputs = generator(PROMPTS, batch_size=len(PROMPTS), return_full_text=False, **SETTINGS)
    assert generator.tokenizer.padding_side == "left"
    for prompt, output in zip(PROMPTS, outputs):
        alone = generated(model, tokenizer, prompt, **SETTINGS)[len(prompt.split()):]
        assert output[0]["generated_text"] == tokenizer.decode(alone, skip_special_tokens=True), prompt


def test_masks_in_the_prompt_are_filled_in_the_full_text(saved):
    _, model, tokenizer = saved
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer,
                         pipeline_class=DiffusionTextGenerationPipeline)
    prompt = "w3 [MASK] w5 [MASK]"
    expected = generated(model, tokenizer, prompt, max_new_tokens=4)
    assert generator(prompt, max_new_tokens=4)[0]["generated_text"] == tokenizer.decode(expected)
    assert generator(prompt, max_new_tokens=None)[0]["generated_text"] == tokenizer.decode(
        generated(model, tokenizer, prompt, max_new_tokens=None))
    assert "[MASK]" not in tokenizer.decode(expected)


def test_a_model_without_a_mask_token_is_refused(saved, monkeypatch):
    _, model, tokenizer = saved
    monkeypatch.setattr(model.config, "mask_token_id", None)
    monkeypatch.setattr(model.generation_config, "mask_token_id", None)
    with pytest.raises(ValueError, match="no mask token.*TextGenerationPipeline"):
        pipeline("text-generation", model=model, tokenizer=tokenizer, pipeline_class=DiffusionTextGenerationPipeline)
