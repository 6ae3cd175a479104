"""DreamBooth metrics (DINO / CLIP-I subject fidelity, CLIP-T prompt fidelity) on tiny feature models, and the
DreamBooth prompt-list readers."""
import numpy as np
import pytest
import torch
from PIL import Image

from visionpeft.eval.subject import (
    clip_encoders, embed, evaluate_pipeline_on_subject, evaluate_subject, image_encoder, mean_pairwise_cosine, prompt_fidelity, read_prompt_list,
    read_prompts_and_classes, render_prompts, subject_fidelity,
)


def noise_images(seed, count, size=32):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


@pytest.fixture(scope="module")
def dino_like():
    """A tiny timm ViT without head: its CLS token is the embedding, as for DINO."""
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                            depth=1, num_heads=2, num_classes=0)
    return image_encoder(vit, to_tensor)


@pytest.fixture(scope="module")
def tiny_clip():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from visionpeft.models.pipelines import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    return clip_encoders(model, processor)


def test_mean_pairwise_cosine_is_the_mean_over_all_pairs():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # pairs: (1, 1/√2) from a0, (0, 1/√2) from a1
    assert mean_pairwise_cosine(a, b) == pytest.approx((1 + 2 / 2 ** 0.5) / 4)
    with pytest.raises(ValueError, match="same D"):
        mean_pairwise_cosine(a, torch.ones(2, 3))


def test_subject_fidelity_is_one_for_the_references_themselves_and_lower_for_other_images(dino_like):
    references = noise_images(0, 1)
    assert subject_fidelity(references, references, dino_like) == pytest.approx(1.0, abs=1e-6)
    assert subject_fidelity(noise_images(1, 3), references, dino_like) < 0.999
    gray = [Image.new("RGB", (32, 32), (128, 128, 128))] * 2
    close = [references[0].point(lambda v: min(255, v + 2))]
    assert subject_fidelity(close, references, dino_like) > subject_fidelity(gray, references, dino_like)


def test_prompt_fidelity_pairs_each_image_with_its_prompt(tiny_clip):
    encode_images, encode_texts = tiny_clip
    images = noise_images(2, 2)
    prompts = ["a photo of a dog", "a red cube"]
    want = (embed(encode_images, images) * embed(encode_texts, prompts)).sum(-1).mean().item()
    assert prompt_fidelity(images, prompts, encode_images, encode_texts) == pytest.approx(want, abs=1e-6)
    swapped = prompt_fidelity(images, prompts[::-1], encode_images, encode_texts)
    assert swapped != pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="one prompt per image"):
        prompt_fidelity(images, prompts[:1], encode_images, encode_texts)


def test_evaluate_subject_reports_the_scores_its_encoders_allow(dino_like, tiny_clip):
    encode_images, encode_texts = tiny_clip
    images, references = noise_images(3, 2), noise_images(4, 2)
    scores = evaluate_subject(images, ["a dog"] * 2, references, dino=dino_like, clip_image=encode_images,
                              clip_text=encode_texts)
    assert set(scores) == {"dino", "clip_i", "clip_t"}
    assert all(-1.0 <= v <= 1.0 for v in scores.values())
    assert set(evaluate_subject(images, ["a dog"] * 2, references, dino=dino_like)) == {"dino"}
    with pytest.raises(ValueError, match="at least one encoder"):
        evaluate_subject(images, ["a dog"] * 2, references)
    with pytest.raises(ValueError, match="clip_text= is given without clip_image="):  # not silently ignored
        evaluate_subject(images, ["a dog"] * 2, references, dino=dino_like, clip_text=encode_texts)


def test_embed_refuses_an_encoder_with_the_wrong_output_shape():
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        embed(lambda items: torch.ones(len(items) + 1, 4), ["x"])
    with pytest.raises(ValueError, match="empty"):
        embed(lambda items: torch.ones(len(items), 4), [])


PROMPTS_AND_CLASSES = """Classes

subject_name,class
backpack,backpack
dog2,dog
bear_plushie,stuffed animal

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a cube shaped {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
'a {0} {1} in a chef outfit'.format(unique_token, class_token)
]
"""


def test_prompts_and_classes_file(tmp_path):
    path = tmp_path / "prompts_and_classes.txt"
    path.write_text(PROMPTS_AND_CLASSES)
    bench = read_prompts_and_classes(path)
    assert bench.subjects == {"backpack": "backpack", "dog2": "dog", "bear_plushie": "stuffed animal"}
    assert bench.is_live("dog2") and not bench.is_live("bear_plushie")
    assert bench.prompts_for("dog2") == ["a sks dog in the jungle", "a sks dog wearing a red hat",
                                         "a sks dog in a chef outfit"]
    assert bench.prompts_for("bear_plushie", "zwx") == ["a zwx stuffed animal in the jungle",
                                                        "a cube shaped zwx stuffed animal"]
    assert bench.text_prompts_for("backpack") == ["a backpack in the jungle", "a cube shaped backpack"]
    with pytest.raises(ValueError, match="unknown subject 'cat'"):
        bench.prompts_for("cat")
    (tmp_path / "other.txt").write_text("just a line\n")
    with pytest.raises(ValueError, match="not a DreamBooth"):
        read_prompts_and_classes(tmp_path / "other.txt")


def test_a_pipeline_is_scored_over_a_subject_prompt_list(tmp_path, dino_like, tiny_clip):
    from visionpeft.models.pipelines import tiny_stable_diffusion

    path = tmp_path / "prompts_and_classes.txt"
    path.write_text(PROMPTS_AND_CLASSES)
    pipeline = tiny_stable_diffusion()
    pipeline.set_progress_bar_config(disable=True)
    encode_images, encode_texts = tiny_clip
    result = evaluate_pipeline_on_subject(pipeline, read_prompts_and_classes(path), "backpack", noise_images(5, 2),
                                          images_per_prompt=2, steps=2, dino=dino_like, clip_image=encode_images,
                                          clip_text=encode_texts)
    assert result["prompts"] == ["a sks backpack in the jungle"] * 2 + ["a cube shaped sks backpack"] * 2
    assert len(result["images"]) == 4 and result["images"][0].size == (32, 32)
    assert {"dino", "clip_i", "clip_t"} <= set(result)


def test_plain_prompt_list(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# recontextualisation\n\na {0} on the beach\n'a {0} in the snow'.format(unique_token),\n")
    templates = read_prompt_list(path)
    assert templates == ["a {0} on the beach", "a {0} in the snow"]
    assert render_prompts(templates, "sks dog") == ["a sks dog on the beach", "a sks dog in the snow"]
    with pytest.raises(ValueError, match="malformed"):
        render_prompts(["a {2} dog"], "sks")
    with pytest.raises(FileNotFoundError):
        read_prompt_list(tmp_path / "missing.txt")
