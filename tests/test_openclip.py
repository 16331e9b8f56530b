"""OpenCLIP: the HF converter, the pool's checkpoint forms, pickles, the task pool and the CLI, offline."""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from safetensors.torch import load_file

from fusion_bench.errors import DatasetError, ModelLoadError, ModelPoolError
from fusion_bench.merge import check_pool_compatible
from fusion_bench.modelpool import OpenCLIPVisionModelPool
from fusion_bench.models.openclip_hf import convert_hf_to_openclip, convert_openclip_to_hf
from fusion_bench.models.openclip_vision import ImageEncoder, OpenCLIPArchitecture
from fusion_bench.models.torch_files import PickleRequiredError
from fusion_bench.taskpool import OpenCLIPVisionModelTaskPool
from fusion_bench.testing.tiny_openclip import TINY_OPENCLIP_CONFIG, build_tiny_openclip_example, tiny_openclip_encoder

TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
OPENCLIP = [
    "modelpool=OpenCLIPVisionModelPool/tiny-openclip_example",
    "taskpool=OpenCLIPVisionModelTaskPool/tiny-openclip_example",
]


@pytest.fixture(scope="module")
def tiny_openclip(tiny_example):
    """The example the shipped tiny-openclip configs point at (the resolver finds it built)."""
    root = Path(os.environ["FUSION_BENCH_EXAMPLE_DIR"] + "-openclip")
    return build_tiny_openclip_example(root, datasets=tiny_example.datasets)


def _pool(ex, **kw) -> OpenCLIPVisionModelPool:
    models = {"_pretrained_": str(ex.pretrained), **{t: str(p) for t, p in ex.finetuned.items()}}
    return OpenCLIPVisionModelPool(
        models, model_config=TINY_OPENCLIP_CONFIG, classification_heads={t: str(p) for t, p in ex.heads.items()}, **kw
    )


def _read_visual(path: Path) -> dict[str, torch.Tensor]:
    """Independent reader of the example's three file forms -> bare tower keys."""
    if path.is_dir():
        state = load_file(str(path / "model.safetensors"))
    elif path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, weights_only=True)
    for prefix in ("model.visual.", "visual."):
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    raise AssertionError(sorted(state)[:3])


# ---- converter -------------------------------------------------------------------------------
@pytest.mark.parametrize("quick_gelu, eps", [(True, None), (False, 1e-6)])
def test_openclip_and_hf_give_the_same_features(quick_gelu, eps):
    vision_cfg = dict(TINY_OPENCLIP_CONFIG["vision_cfg"], **({"norm_kwargs": {"eps": eps}} if eps else {}))
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(16, vision_cfg, TEXT_CFG, quick_gelu=quick_gelu).eval()
    with torch.no_grad():
        for p in clip.visual.parameters():
            p.add_(0.2 * torch.randn_like(p))
    images = torch.randn(4, 3, 32, 32)
    expected = clip.encode_image(images)  # open_clip's own forward, (4, 16)

    arch = OpenCLIPArchitecture(16, vision_cfg, quick_gelu=quick_gelu)
    hf = convert_openclip_to_hf(ImageEncoder(arch, visual=clip.visual))
    assert hf.config.hidden_act == ("quick_gelu" if quick_gelu else "gelu") and hf.config.layer_norm_eps == (
        eps or 1e-5
    )
    with torch.no_grad():
        got = hf(pixel_values=images).image_embeds
        back = convert_hf_to_openclip(hf)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert torch.allclose(back(images), expected, atol=1e-6)
    assert back.architecture.quick_gelu is quick_gelu


def test_converter_refuses_towers_hf_cannot_express():
    arch = OpenCLIPArchitecture(16, dict(TINY_OPENCLIP_CONFIG["vision_cfg"], ls_init_value=0.1))
    with pytest.raises(ModelLoadError, match=r"uses \{'ls_init_value': 0.1\}, which HF CLIPVisionModel cannot express"):
        convert_openclip_to_hf(ImageEncoder(arch))


# ---- the pool ----------------------------------------------------------------------------------
def test_pool_reads_every_checkpoint_form_per_tensor(tiny_openclip):
    pool = _pool(tiny_openclip)
    assert pool.model_names == ["mnist", "eurosat", "svhn"]
    keys = check_pool_compatible(pool, ["_pretrained_", *pool.model_names])
    assert "model.visual.conv1.weight" in keys and not [k for k in keys if not k.startswith("model.visual.")]
    for name, path in [("_pretrained_", tiny_openclip.pretrained), *tiny_openclip.finetuned.items()]:
        expected = _read_visual(path)
        assert sorted(pool.keys(name)) == sorted("model.visual." + k for k in expected)
        assert torch.equal(pool.get_tensor(name, "model.visual.proj"), expected["proj"])
        model = pool.load_model(name)
        assert all(torch.equal(v, expected[k.removeprefix("model.visual.")]) for k, v in model.state_dict().items())
    assert pool.architecture("svhn") == OpenCLIPArchitecture.from_config(TINY_OPENCLIP_CONFIG)  # from its folder
    import datasets

    image = datasets.load_from_disk(str(tiny_openclip.datasets["mnist"]))["test"][0]["image"]  # grayscale: made RGB
    pixels = pool.load_processor()(images=[image])["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32) and torch.equal(
        pixels[0], open_clip.image_transform(32, is_train=False)(image)
    )


def test_pool_saves_a_folder_it_reads_back(tiny_openclip, tmp_path):
    pool = _pool(tiny_openclip)
    model = pool.load_model("mnist")
    pool.save_model(model, tmp_path / "saved", description="x")
    again = OpenCLIPVisionModelPool({"m": str(tmp_path / "saved")})  # no architecture given: the folder records it
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(again.load_model("m")(images), model(images))


def test_pickled_tower_of_an_unknown_architecture(tmp_path):
    resnet = open_clip.model.CLIP(16, {"layers": [1, 1, 1, 1], "width": 8, "image_size": 32, "head_width": 8}, TEXT_CFG)
    torch.save(resnet, tmp_path / "rn.pt")
    with pytest.raises(
        ModelLoadError,
        match=r"model 'x' \(.*rn.pt\): unknown OpenCLIP architecture: the pickled ModifiedResNet is not a plain open_clip ViT .*give its model_name",
    ):
        OpenCLIPVisionModelPool({"x": str(tmp_path / "rn.pt")}, allow_pickle=True).load_model("x")


def test_architecture_errors(tiny_openclip):
    with pytest.raises(
        ModelLoadError, match=r"model 'x': unknown OpenCLIP architecture 'ViT-B-33'\. Did you mean 'ViT-B-32'"
    ):
        OpenCLIPVisionModelPool({"x": {"model_name": "ViT-B-33", "state_dict_path": "a.pt"}})
    pool = OpenCLIPVisionModelPool({"x": str(tiny_openclip.finetuned["mnist"])}, model_name="ViT-B-32")
    with pytest.raises(
        ModelLoadError,
        match=r"model 'x' \(.*finetuned.pt\): the checkpoint does not match the OpenCLIP architecture 'ViT-B-32' \(.*check model_name",
    ):
        pool.load_model("x")
    with pytest.raises(ModelPoolError, match=r"model 'x': .* does not record its architecture; give model_name"):
        OpenCLIPVisionModelPool({"x": str(tiny_openclip.finetuned["mnist"])}).load_model("x")
    with pytest.raises(
        ModelPoolError, match=r"model 'x': an entry needs exactly one of 'path', 'state_dict_path', 'pickle_path'"
    ):
        OpenCLIPVisionModelPool({"x": {"model_name": "ViT-B-32", "path": "a", "pickle_path": "b"}})


# ---- pickles -----------------------------------------------------------------------------------
MODELING = """
import torch

class ImageEncoder(torch.nn.Module):
    def __init__(self, clip, preprocess):
        super().__init__()
        self.model, self.train_preprocess, self.val_preprocess = clip, preprocess, preprocess
        delattr(self.model, "transformer")

class ClassificationHead(torch.nn.Linear):
    def __init__(self, normalize, weights):
        super().__init__(weights.shape[1], weights.shape[0])
        self.normalize = normalize
        self.weight = torch.nn.Parameter(weights.clone())
"""


def _task_vectors_pickles(tmp_path: Path, monkeypatch) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """An ImageEncoder and a head pickled by a stand-in of the task_vectors repo (``src.modeling``,
    with open_clip 2.0's class name ``VisualTransformer``); afterwards neither can be imported."""
    (tmp_path / "repo" / "src").mkdir(parents=True)
    (tmp_path / "repo" / "src" / "__init__.py").write_text("")
    (tmp_path / "repo" / "src" / "modeling.py").write_text(MODELING)
    legacy = type("VisualTransformer", (open_clip.transformer.VisionTransformer,), {"__module__": "open_clip.model"})
    with monkeypatch.context() as m:
        m.syspath_prepend(str(tmp_path / "repo"))
        m.setattr(open_clip.model, "VisualTransformer", legacy, raising=False)
        import src.modeling

        torch.manual_seed(1)
        clip = open_clip.model.CLIP(16, TINY_OPENCLIP_CONFIG["vision_cfg"], TEXT_CFG, quick_gelu=True).eval()
        clip.visual.__class__ = legacy
        encoder = src.modeling.ImageEncoder(clip, open_clip.image_transform(32, is_train=False))
        torch.save(encoder, tmp_path / "finetuned.pt")
        torch.save(src.modeling.ClassificationHead(True, torch.randn(10, 16)), tmp_path / "head_T.pt")
        expected = {k: v.clone() for k, v in encoder.state_dict().items() if k.startswith("model.visual.")}
        for mod in ("src.modeling", "src"):
            sys.modules.pop(mod, None)
    return tmp_path / "finetuned.pt", tmp_path / "head_T.pt", expected


def test_pickles_need_opt_in_and_load_with_redirected_classes(tmp_path, monkeypatch):
    encoder_file, head_file, expected = _task_vectors_pickles(tmp_path, monkeypatch)
    with pytest.raises(ImportError):
        __import__("src.modeling")
    with zipfile.ZipFile(encoder_file) as z:  # the pickle names the class open_clip 2.0 had
        assert b"VisualTransformer" in z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    with pytest.raises(PickleRequiredError, match=r"model 'x': .*finetuned.pt' is a pickle .* set allow_pickle: true"):
        OpenCLIPVisionModelPool({"x": str(encoder_file)}).load_model("x")
    with pytest.raises(
        PickleRequiredError, match=r"model 'x': .*finetuned.pt' is a pickle"
    ):  # never, for state_dict_path
        OpenCLIPVisionModelPool(
            {"x": {"model_name": "ViT-B-32", "state_dict_path": str(encoder_file)}}, allow_pickle=True
        ).keys("x")

    pool = OpenCLIPVisionModelPool(
        {"x": str(encoder_file)}, classification_heads={"t": str(head_file)}, allow_pickle=True
    )
    model = pool.load_model("x")  # architecture read off the pickled tower
    assert model.architecture.quick_gelu and model.architecture.vision_cfg["layers"] == 2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    head = pool.load_classification_head("t")
    assert head.normalize and tuple(head.weight.shape) == (10, 16)

    from fusion_bench.scripts.convert_task_vectors import main as convert

    convert([str(tmp_path), str(tmp_path / "converted")])  # once, trusting the files; then no pickle is needed
    safe = OpenCLIPVisionModelPool(
        {"x": {"pickle_path": "finetuned.pt"}},
        model_dir=str(tmp_path / "converted"),
        model_name=None,
        model_config=model.architecture.to_config(),
        classification_heads={"t": "head_T.pt"},
    )
    assert all(torch.equal(safe.load_model("x").state_dict()[k], v) for k, v in expected.items())
    assert torch.equal(safe.load_classification_head("t").weight, head.weight)


def test_pickle_naming_a_missing_module_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "gone_pkg").mkdir()
    (tmp_path / "gone_pkg" / "__init__.py").write_text("import torch\nclass Thing(torch.nn.Module):\n    pass\n")
    with monkeypatch.context() as m:
        m.syspath_prepend(str(tmp_path))
        import gone_pkg

        torch.save(gone_pkg.Thing(), tmp_path / "thing.pt")
        sys.modules.pop("gone_pkg")
    pool = OpenCLIPVisionModelPool({"x": str(tmp_path / "thing.pt")}, allow_pickle=True)
    with pytest.raises(
        ModelLoadError,
        match=r"model 'x': the pickle .*thing.pt' needs gone_pkg.Thing, which cannot be imported \(ModuleNotFoundError",
    ):
        pool.load_model("x")


# ---- task pool and CLI ---------------------------------------------------------------------------
def _oracle_accuracy(ex, state: dict[str, torch.Tensor], task: str) -> tuple[float, float]:
    """Accuracy/loss computed without the library: open_clip's own tower and transform, the head by hand."""
    import datasets
    from open_clip.model import _build_vision_tower

    visual = _build_vision_tower(16, TINY_OPENCLIP_CONFIG["vision_cfg"], quick_gelu=True)
    visual.load_state_dict(state)
    test = datasets.load_from_disk(str(ex.datasets[task]))["test"]
    transform = open_clip.image_transform(32, is_train=False)
    head = load_file(str(ex.heads[task]))
    with torch.no_grad():
        feats = visual(torch.stack([transform(r["image"].convert("RGB")) for r in test]))
        logits = F.normalize(feats, dim=-1) @ head["weight"].T + head["bias"]
    labels = torch.tensor(test["label"])
    return (logits.argmax(-1) == labels).sum().item() / len(labels), F.cross_entropy(logits, labels).item()


def test_task_arithmetic_through_the_cli_matches_an_oracle(tiny_openclip, tmp_path):
    report_path = tmp_path / "r.json"
    proc = run_cli(
        ["method=task_arithmetic", "method.scaling_factor=0.3", *OPENCLIP, f"report_save_path={report_path}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    base = _read_visual(tiny_openclip.pretrained)
    experts = [_read_visual(p) for p in tiny_openclip.finetuned.values()]
    merged = {k: base[k] + 0.3 * sum(e[k] - base[k] for e in experts) for k in base}
    for task in tiny_openclip.finetuned:
        accuracy, loss = _oracle_accuracy(tiny_openclip, merged, task)
        assert report[task]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
        assert report[task]["loss"] == pytest.approx(loss, rel=1e-4)
    assert report["average"]["accuracy"] > 0.5  # heads from class means: far above chance (1/10)


def test_taskpool_checks_head_against_dataset(tiny_openclip):
    ex = tiny_openclip
    taskpool = OpenCLIPVisionModelTaskPool({"mnist": str(ex.datasets["mnist"])}, {"mnist": str(ex.heads["mnist"])})
    expected = _oracle_accuracy(ex, _read_visual(ex.pretrained), "mnist")[0]
    assert taskpool.evaluate(_pool(ex).load_pretrained_model())["mnist"]["accuracy"] == pytest.approx(
        expected, abs=1e-12
    )

    from fusion_bench.models.openclip_checkpoints import save_classification_head
    from fusion_bench.models.openclip_vision import ClassificationHead

    bad = save_classification_head(ClassificationHead(True, torch.randn(7, 16)), ex.root.parent / "head7.safetensors")
    with pytest.raises(
        DatasetError, match=r"test dataset 'mnist': the dataset has 10 classes but 7 rows in its classification head"
    ):
        OpenCLIPVisionModelTaskPool({"mnist": str(ex.datasets["mnist"])}, {"mnist": str(bad)}).setup()
    wide = OpenCLIPVisionModelTaskPool(
        {"mnist": str(ex.datasets["mnist"])},
        {"mnist": {"_target_": "torch.nn.Linear", "in_features": 8, "out_features": 10}},
    )
    with pytest.raises(
        ModelLoadError, match=r"classification head 'mnist' takes 8 features but the model's embedding has 16"
    ):
        wide.evaluate(tiny_openclip_encoder())


def test_taskpool_shards_its_test_sets_between_processes(tiny_openclip):
    from types import SimpleNamespace

    ex = tiny_openclip
    taskpool = OpenCLIPVisionModelTaskPool({"mnist": str(ex.datasets["mnist"])}, {"mnist": str(ex.heads["mnist"])})
    taskpool.setup()
    transform = _pool(ex).load_pretrained_model().val_preprocess
    size = len(taskpool.test_datasets["mnist"])
    shards = []
    for rank in range(2):
        taskpool.fabric = SimpleNamespace(global_rank=rank, world_size=2)
        shards.append(list(taskpool.get_dataloader("mnist", transform).sampler))
    assert sorted(shards[0] + shards[1]) == list(range(size)) and not set(shards[0]) & set(shards[1])
    assert len(list(taskpool.get_dataloader("mnist", transform, limit=5).sampler)) == 2  # 5 samples: rank 1 gets 2
