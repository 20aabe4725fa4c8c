"""ImageNet-layout pipelines with real DALI on the CPU, against torchvision."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from pipelines import DataConfig, LoaderSpec, build_loader, resolve_backend, val_shard_indices
from pipelines.sample_rng import sample_uniforms
from devices import cuda_case, torch_device
from pipeline_data import dali_operators, write_jpeg_folder

dali = pytest.importorskip("pipelines.dali")

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_jpeg_folder(tmp_path_factory.mktemp("jpegs"), per_class=6, size=(300, 260))


def cfg_for(root, backend, **kw):
    return DataConfig(root=str(root), backend=backend, workers=kw.pop("workers", 0 if backend == "torch" else 2), **kw)


def test_auto_is_dali_where_it_imports():
    assert resolve_backend("auto") == "dali"


def site_packages_without_dali(folder: Path) -> Path:
    """This environment's packages with DALI not installed: a folder of links to every entry
    of site-packages but DALI's (``nvidia/dali`` and its dist-info)."""
    import sysconfig
    site = Path(sysconfig.get_paths()["purelib"])
    (folder / "nvidia").mkdir(parents=True)
    for entry in site.iterdir():
        if entry.name.startswith("nvidia_dali"):
            continue
        if entry.name == "nvidia":
            for part in entry.iterdir():
                if part.name != "dali":
                    (folder / "nvidia" / part.name).symlink_to(part)
        else:
            (folder / entry.name).symlink_to(entry)
    return folder


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_a_torch_run_imports_no_dali_and_auto_falls_back_to_it(folder, tmp_path, backend):
    """In a new interpreter: ``auto`` where DALI is not installed (``python -S`` on this
    environment's packages but DALI's) is the torch backend, and its loader gives a batch;
    ``torch`` asked for imports no DALI where it is installed."""
    import subprocess
    repo = Path(__file__).resolve().parents[1]
    paths = [str(repo)]
    if backend == "auto":
        paths.insert(0, str(site_packages_without_dali(tmp_path / "site")))
    code = (f"import sys; sys.path[:0] = {paths!r}; "
            "from pipelines import DataConfig, LoaderSpec, build_loader, resolve_backend; "
            f"cfg = DataConfig(root={str(folder)!r}, backend={backend!r}, workers=0); "
            "images, labels = next(iter(build_loader(cfg, LoaderSpec('train', 4)))); "
            "print(resolve_backend(cfg.backend), tuple(images.shape), "
            "'nvidia.dali' in sys.modules)")
    flags = ["-S"] if backend == "auto" else []
    proc = subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["torch", "(4,", "3,", "224,", "224)", "False"], proc.stdout


# (backend, device): DALI on the GPU is its "mixed" pipeline (nvJPEG decoding, GPU resize)
BACKEND_DEVICES = [("dali", "cpu"), ("torch", "cpu"), cuda_case("dali")]


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_labels_follow_imagefolder_order_and_val_covers_each_image_once(folder, backend, device):
    reference = ImageFolder(str(folder / "val"))
    assert reference.classes == ["a_cls", "b_cls", "c_cls"]
    cfg = cfg_for(folder, backend, image_size=64, val_resize=72)
    seen = []
    for rank in range(3):  # 18 images over 3 ranks, batch 4: short last batches
        loader = build_loader(cfg, LoaderSpec("val", batch_size=4, rank=rank, world_size=3,
                                              device=torch_device(device)))
        assert loader.num_classes == 3 and loader.num_samples == 6 and len(loader) == 2
        batches = list(loader)
        assert [len(b[1]) for b in batches] == [4, 2]
        assert all(b[0].device.type == b[1].device.type == device for b in batches)
        labels = torch.cat([b[1].cpu() for b in batches])
        expected = [reference.targets[i] for i in val_shard_indices(18, rank, 3)]
        assert labels.dtype == torch.int64 and labels.tolist() == expected
        seen += val_shard_indices(18, rank, 3).tolist()
    assert sorted(seen) == list(range(18))


RESIZE_DEVICES = [("torch", "cpu"), ("dali", "cpu"), cuda_case("dali")]


@pytest.mark.parametrize("resize_with, device", RESIZE_DEVICES)
@pytest.mark.parametrize("split", ["train", "val"])
def test_shapes_dtypes_memory_format(folder, split, resize_with, device):
    batches = {}
    for channels_last in (False, True):
        cfg = cfg_for(folder, "dali", image_size=96, val_resize=110, channels_last=channels_last,
                      resize_with=resize_with)
        spec = LoaderSpec(split, batch_size=5, seed=3, device=torch_device(device))
        images, labels = next(iter(build_loader(cfg, spec)))
        assert images.shape == (5, 3, 96, 96) and images.dtype == torch.float32
        assert labels.shape == (5,) and labels.dtype == torch.int64
        assert images.device.type == labels.device.type == device
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert images.is_contiguous(memory_format=fmt)
        assert -3 < images.min() < -0.5 and 0.5 < images.max() < 3  # normalised, not 0..255
        batches[channels_last] = images
    assert torch.equal(batches[True], batches[False])  # the same values in either layout


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("h, w, pad", [(224, 224, 0), (37, 301, 5)])  # > one 256-pixel chunk
def test_compiled_normalisation_equals_torch_ops(monkeypatch, h, w, pad, flip, channels_last):
    """pipelines/_normalize.c (built by setup.py) writes the same floats as torch's ops."""
    from pipelines import torch_resize
    kernel = torch_resize._kernel
    assert kernel is not None, ("pipelines/_normalize.c is not built: "
                                "pip install -e . needs a C compiler")
    pixels = torch.randint(0, 256, (h, w + pad, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(w))
    image = pixels[:, pad:].permute(2, 0, 1)  # (3, h, w) over HWC memory, rows 3 * (w + pad) apart
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    results = []
    for selected in (kernel, None):
        monkeypatch.setattr(torch_resize, "_kernel", selected)
        batch = torch.full((2, 3, h, w), float("nan")).contiguous(memory_format=fmt)
        assert torch_resize._kernel_layouts(batch[1], image)  # the kernel's case, not a fallback
        torch_resize.normalize_into(batch[1], image, torch_resize.normalization_constants(batch),
                                    flip=flip)
        assert batch[0].isnan().all()  # nothing written outside the image
        results.append(batch[1])
    assert torch.equal(results[0], results[1])
    expected = ((image.flip(-1) if flip else image).float() / 255 - MEAN) / STD
    assert (results[0] - expected).abs().max() < 1e-5


def test_loader_says_when_the_compiled_normalisation_is_missing(folder, monkeypatch, caplog):
    from pipelines import torch_resize
    monkeypatch.setattr(torch_resize, "_kernel", None)
    loader = build_loader(cfg_for(folder, "dali", image_size=32), LoaderSpec("train", batch_size=4))
    assert "_normalize.c is not built" in caplog.text
    images, _ = next(iter(loader))  # and works without it
    assert images.shape == (4, 3, 32, 32) and images.isfinite().all()


def test_compiled_normalisation_rejects_what_it_cannot_do():
    from pipelines import torch_resize
    out = torch.empty(3, 4, 4)
    strided = torch.zeros(3, 4, 8, dtype=torch.uint8)[:, :, ::2]  # pixels not 3 bytes apart
    assert not torch_resize._kernel_layouts(out, strided)
    hwc = torch.zeros(4, 4, 3, dtype=torch.uint8).permute(2, 0, 1)
    assert torch_resize._kernel_layouts(out, hwc)  # the same image the kernel does take
    assert not torch_resize._kernel_layouts(out.double(), hwc)
    with pytest.raises(ValueError, match="row stride"):
        torch_resize._kernel.normalize(0, 2, 1, 1, 0, True, 0, 0, False)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """Pixel noise at varied sizes and aspect ratios: a half-pixel shift or a one-pixel size
    error in the resize shows up as a large difference."""
    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp("noisy")
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(5):
                h, w = rng.integers(230, 420, 2)
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.JPEG", quality=90)
    return root


def levels(normalised: torch.Tensor) -> torch.Tensor:
    """Normalised images back to 0..255 units."""
    return (normalised * STD + MEAN) * 255


# mean and max |difference| in 8-bit levels to torchvision's tensor transforms: torch's resize
# is torchvision's own kernel (equal up to float rounding); DALI's resampler rounds differently;
# on the GPU nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's too, most on
# this pixel noise (the README's half-level claim is for photographs, checked below)
TOLERANCE = {("torch", "cpu"): (1e-3, 1e-2), ("dali", "cpu"): (0.5, 1.5),
             ("dali", "cuda"): (2.0, None)}


@pytest.mark.parametrize("resize_with, device", RESIZE_DEVICES)
def test_val_matches_torchvision_resize_centercrop(noisy, resize_with, device):
    """DALI val vs torchvision Resize(256, antialias) + CenterCrop(224) on the same JPEGs."""
    cfg = cfg_for(noisy, "dali", resize_with=resize_with)
    spec = LoaderSpec("val", batch_size=4, device=torch_device(device))
    images = torch.cat([b[0].cpu() for b in build_loader(cfg, spec)])
    reference = ImageFolder(str(noisy / "val"), transform=v2.Compose([
        v2.PILToTensor(), v2.Resize(256, antialias=True), v2.CenterCrop(224)]))
    expected = torch.stack([reference[i][0] for i in range(len(reference))]).float()
    diff = (levels(images) - expected).abs()
    mean_tol, max_tol = TOLERANCE[resize_with, device]
    assert diff.mean() < mean_tol, diff.mean()
    assert max_tol is None or diff.max() < max_tol, diff.max()
    assert (levels(images) - expected.roll(1, 0)).abs().mean() > 30  # the check can fail


@pytest.mark.parametrize("resize_with, device", RESIZE_DEVICES)
def test_train_crops_are_torchvision_randomresizedcrop_windows(noisy, resize_with, device):
    """Each train image is the RandomResizedCrop window computed from (seed, epoch, index),
    resized with antialiasing and flipped where the per-sample coin says so: the same windows
    on the CPU and on the GPU."""
    cfg = cfg_for(noisy, "dali", image_size=64, min_crop_area=0.08, resize_with=resize_with)
    loader = build_loader(cfg, LoaderSpec("train", batch_size=3, seed=5,
                                          device=torch_device(device)))
    loader.set_epoch(2)
    order = loader.order.tolist()
    images = levels(torch.cat([b[0].cpu() for b in loader]))
    u = sample_uniforms(5, 2, order, 4 * dali.ATTEMPTS + 1)
    samples = loader.samples
    flips, expected = 0, []
    for k, i in enumerate(order):
        pil = Image.open(samples.root / samples.files[i]).convert("RGB")
        left, top, w, h = dali.rrc_window(pil.height, pil.width, u[k], (0.08, 1.0))
        assert 0 <= left and left + w <= pil.width and 0 <= top and top + h <= pil.height
        x = TF.resized_crop(TF.pil_to_tensor(pil), top, left, h, w, [64, 64], antialias=True)
        if u[k, -1] < 0.5:
            x, flips = x.flip(-1), flips + 1
        expected.append(x.float())
    expected = torch.stack(expected)
    diff = (images - expected).abs()
    mean_tol, max_tol = TOLERANCE[resize_with, device]
    assert diff.mean() < mean_tol, diff.mean()
    if resize_with == "torch":
        assert diff.max() < max_tol, diff.max()
    assert (images - expected.roll(1, 0)).abs().mean() > 10  # another image: ~16 levels off
    assert 0 < flips < len(order)


@pytest.mark.parametrize("resize_with, device", RESIZE_DEVICES[1:] + [("torch", "cpu")])
@pytest.mark.parametrize("split", ["train", "val"])
def test_every_decoder_of_every_graph_asks_for_fancy_upsampling(folder, split, resize_with,
                                                                  device):
    """nvJPEG rebuilds 4:2:0 chroma its own way unless jpeg_fancy_upsampling is set; the
    argument as DALI records it in the pipeline it runs, on every decoder of every graph (what
    the decoders then do with decoder_args: the two tests below)."""
    cfg = cfg_for(folder, "dali", image_size=32, resize_with=resize_with)
    loader = build_loader(cfg, LoaderSpec(split, batch_size=4, device=torch_device(device)))
    decoders = [(name, dev, args) for name, dev, args in
                dali_operators(loader.pipeline(loader.source(loader.order.tolist())))
                if name.startswith("decoders__")]
    assert [name for name, _, _ in decoders] == [
        "decoders__ImageSlice" if split == "train" else "decoders__Image"]
    assert all(dev == ("mixed" if device == "cuda" else "cpu") for _, dev, _ in decoders)
    assert all(args.get("jpeg_fancy_upsampling") is True for _, _, args in decoders), decoders


def noisy_420_jpeg() -> bytes:
    """Colour noise saved with 4:2:0 chroma, where the ways of upsampling chroma differ most."""
    pixels = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95, subsampling=2)   # 2: 4:2:0
    return out.getvalue()


def dali_decoded(jpeg: bytes, decoder_device: str, **change) -> np.ndarray:
    """One JPEG through fn.decoders.image with the graphs' decoder_args (``change``d)."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=1, num_threads=1,
                  device_id=0 if decoder_device == "mixed" else None)
    def one_image():
        data = fn.external_source(source=lambda: [np.frombuffer(jpeg, np.uint8)], batch=True)
        return fn.decoders.image(data, **{**dali.decoder_args(decoder_device), **change})

    pipe = one_image()
    pipe.build()
    (images,) = pipe.run()
    images = images.as_cpu() if decoder_device == "mixed" else images
    return np.array(images.at(0)).astype(np.int64)


def libjpeg_rgb(y, cb, cr) -> np.ndarray:
    """libjpeg-turbo's YCbCr -> RGB, integer for integer (jdcolor.c, ycc_rgb_convert)."""
    fix = lambda x: int(x * 65536 + 0.5)   # noqa: E731
    y, cb, cr = y.astype(np.int64), cb.astype(np.int64) - 128, cr.astype(np.int64) - 128
    half = 1 << 15
    rgb = (y + ((fix(1.402) * cr + half) >> 16),
           y + ((-fix(0.34414) * cb - fix(0.71414) * cr + half) >> 16),
           y + ((fix(1.772) * cb + half) >> 16))
    return np.clip(np.stack(rgb, -1), 0, 255)


def decoded_ycbcr(jpeg: bytes, scale: int = 1) -> np.ndarray:
    """Y, Cb, Cr as libjpeg-turbo decodes them (before its conversion to RGB), 1/``scale`` size."""
    image = Image.open(io.BytesIO(jpeg))
    image.draft("YCbCr", (image.width // scale, image.height // scale))
    return np.asarray(image).transpose(2, 0, 1)


def plainly_upsampled(jpeg: bytes) -> np.ndarray:
    """The JPEG as libjpeg decodes it with do_fancy_upsampling off: each stored chroma sample
    repeated over its 2x2 pixels, then the integer YCbCr -> RGB (jdmerge.c). PIL gives the
    pieces: Y at full size; Cb and Cr at half size, where libjpeg-turbo computes chroma with
    its full 8x8 IDCT instead of upsampling it (jdmaster.c), i.e. the stored samples (upsampled
    with libjpeg's h2v2 fancy filter they gave PIL's full-size chroma exactly, 5 of 5 images)."""
    (y, _, _), (_, cb, cr) = decoded_ycbcr(jpeg), decoded_ycbcr(jpeg, 2)
    return libjpeg_rgb(y, *(c.repeat(2, 0).repeat(2, 1) for c in (cb, cr)))


def test_decoders_upsample_chroma_as_libjpeg_turbo_does():
    """The CPU graph decodes a 4:2:0 JPEG as PIL (libjpeg-turbo, fancy upsampling: what the
    torch backend decodes) does, within 1 level (0 measured); a decode with plain upsampling is
    tens of levels away (83 at most on this image), so the test would see the other way.
    DALI's CPU decoder ignores jpeg_fancy_upsampling (made for the mixed one: "the same chroma
    upsampling approach as the cpu one"), so the flag itself is checked on the GPU, below."""
    jpeg = noisy_420_jpeg()
    pil = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(np.int64)
    assert np.array_equal(libjpeg_rgb(*decoded_ycbcr(jpeg)), pil)   # the reference's conversion
    ours = dali_decoded(jpeg, "cpu")
    assert np.abs(ours - pil).max() <= 1
    assert np.abs(plainly_upsampled(jpeg) - pil).max() > 40
    without = dali_decoded(jpeg, "cpu", jpeg_fancy_upsampling=False)
    assert np.array_equal(without, ours), "DALI's CPU decoder now reads jpeg_fancy_upsampling"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_decoder_upsamples_chroma_as_the_cpu_one():
    """nvJPEG with decoder_args("mixed") decodes the 4:2:0 JPEG within a bound of the CPU
    decode, and beyond it without jpeg_fancy_upsampling (nvJPEG's own way, reported to be
    nearest-neighbour). The bound is a quarter of the largest difference between plain and
    fancy upsampling of this image, measured on the CPU (83 levels, so 20.75): about 3x what a
    coarser IDCT changes (libjpeg-turbo's fast integer IDCT: 7 levels at most on this image),
    a quarter of what a decode without the flag would be off by if nvJPEG's own upsampling is
    the plain one. The second comparison checks the bound on the GPU itself."""
    jpeg = noisy_420_jpeg()
    cpu = dali_decoded(jpeg, "cpu")
    bound = np.abs(plainly_upsampled(jpeg) - cpu).max() / 4
    fancy = np.abs(dali_decoded(jpeg, "mixed") - cpu).max()
    plain = np.abs(dali_decoded(jpeg, "mixed", jpeg_fancy_upsampling=False) - cpu).max()
    assert fancy <= bound < plain, (fancy, bound, plain)


def test_resize_with_picks_dali_on_the_gpu_and_torch_on_the_cpu():
    assert dali.resize_in_dali("auto", cuda=True) and not dali.resize_in_dali("auto", cuda=False)
    assert dali.resize_in_dali("dali", cuda=False) and not dali.resize_in_dali("torch", cuda=False)
    with pytest.raises(ValueError, match="resize_with=torch"):
        dali.resize_in_dali("torch", cuda=True)
    with pytest.raises(ValueError, match="valid: auto, dali, torch"):
        dali.resize_in_dali("pil", cuda=False)


def test_val_geometry_rounds_like_torchvision():
    from torchvision.transforms.v2.functional._geometry import _compute_resized_output_size
    rng = np.random.default_rng(0)
    for h, w in rng.integers(100, 900, (300, 2)):
        assert dali.resized_size(h, w, 256) == tuple(_compute_resized_output_size((h, w), [256]))
    geometry = dali.ValGeometry(256, 224)
    for extent in range(224, 400):
        offset = int(round((extent - 224) / 2.0))  # torchvision's center_crop
        assert round(geometry.position(extent) * (extent - 224)) == offset


def test_rrc_window_distribution_and_fallback():
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(2000):
        left, top, w, h = dali.rrc_window(375, 500, rng.random(41), (0.08, 1.0))
        assert 0 <= left <= 500 - w and 0 <= top <= 375 - h
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
        areas.append(w * h / (375 * 500))
    assert min(areas) < 0.1 and max(areas) > 0.9
    assert dali.rrc_window(100, 1000, np.full(41, 0.99), (0.9, 1.0)) == (433, 0, 133, 100)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_resume_replays_the_epoch_bitwise(folder, backend, device):
    cfg = cfg_for(folder, backend, image_size=48)
    loader = build_loader(cfg, LoaderSpec("train", batch_size=4, seed=7,
                                          device=torch_device(device)))
    loader.set_epoch(1)
    full = list(loader)
    assert len(full) == len(loader) == 4
    rng = torch.get_rng_state()
    loader.set_epoch(1, start_batch=2)
    tail = list(loader)
    assert torch.equal(rng, torch.get_rng_state())  # the loader leaves the global RNG alone
    assert len(tail) == 2
    for (a, la), (b, lb) in zip(full[2:], tail):
        assert torch.equal(a, b) and torch.equal(la, lb)
    loader.set_epoch(2)
    assert not torch.equal(next(iter(loader))[0], full[0][0])


def test_jpeg_size_reads_the_frame_header(tmp_path):
    for size, kw in (((37, 51), {}), ((640, 480), {"progressive": True})):
        Image.new("RGB", size).save(tmp_path / "x.jpg", **kw)
        assert dali.jpeg_size(np.fromfile(tmp_path / "x.jpg", np.uint8)) == (size[1], size[0])
    Image.new("RGB", (9, 7)).save(tmp_path / "x.png")
    data = (tmp_path / "x.png").read_bytes()
    assert dali.jpeg_size(np.frombuffer(data, np.uint8)) is None
    assert dali.size_or_problem(data) == (7, 9)   # PNG: sized by PIL


def test_size_or_problem_names_what_cannot_be_fed(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "x.jpg")
    jpeg = (tmp_path / "x.jpg").read_bytes()
    assert dali.size_or_problem(jpeg) == (30, 40)
    assert dali.size_or_problem(jpeg[:len(jpeg) // 2]).startswith("truncated")
    assert dali.size_or_problem(b"no image at all").startswith("not an image")
    sof = jpeg.index(b"\xff\xc0")
    zero_height = jpeg[:sof + 5] + b"\x00\x00" + jpeg[sof + 7:]
    assert dali.size_or_problem(zero_height).startswith("not an image")


def test_synthetic_backend(folder):
    cfg = DataConfig(backend="synthetic", image_size=32, num_classes=7, synthetic_samples=100)
    loader = build_loader(cfg, LoaderSpec("train", batch_size=8, world_size=2))
    batches = list(loader)
    assert len(batches) == len(loader) == 6 and loader.num_classes == 7
    assert batches[0][0].shape == (8, 3, 32, 32) and batches[0][1].max() < 7


def test_to_torch_keeps_cpu_outputs_on_the_cpu_whatever_the_loader_device():
    """A "mixed" pipeline's labels are a TensorListCPU, which has ``as_cpu`` like a GPU one: it
    must be read as host memory (DALI's own iterator does the same), never fed into a CUDA buffer
    by a GPU copy. The loader then moves it to its device."""
    from nvidia.dali import pipeline_def
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali.tensors import TensorListCPU, TensorListGPU

    labels = [np.array([7], dtype=np.int64), np.array([3], dtype=np.int64)]

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe():
        return fn.external_source(source=lambda: labels, dtype=types.INT64)

    p = pipe()
    p.build()
    (out,) = p.run()
    assert isinstance(out, TensorListCPU) and hasattr(out, "as_cpu")   # the trap
    tensor = dali.to_torch(out, torch.int64)
    assert tensor.device.type == "cpu" and tensor.view(-1).tolist() == [7, 3]
    with pytest.raises(TypeError, match="expected torch.float32"):
        dali.to_torch(out, torch.float32)
    assert not issubclass(TensorListCPU, TensorListGPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_pipeline_batches_land_on_the_gpu(folder):
    for split in ("train", "val"):
        loader = build_loader(cfg_for(folder, "dali", image_size=64, val_resize=72),
                              LoaderSpec(split, batch_size=4, device=torch.device("cuda", 0)))
        images, labels = next(iter(loader))
        assert images.device.type == labels.device.type == "cuda"
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        cpu_labels = next(iter(build_loader(cfg_for(folder, "dali", image_size=64, val_resize=72),
                                            LoaderSpec(split, batch_size=4))))[1]
        assert labels.cpu().tolist() == cpu_labels.tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_val_images_are_within_half_a_level_of_torchvision(folder):
    """The README's claim: on the GPU (nvJPEG + DALI's resize) the validation images are within
    half an 8-bit level of torchvision's Resize(256)+CenterCrop(224), on average."""
    from pipelines.torch_backend import IMAGENET_STD
    kw = dict(image_size=224, val_resize=256)
    gpu = build_loader(cfg_for(folder, "dali", **kw),
                       LoaderSpec("val", batch_size=6, device=torch.device("cuda", 0)))
    cpu = build_loader(cfg_for(folder, "torch", **kw), LoaderSpec("val", batch_size=6))
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    levels = []
    for (a, la), (b, lb) in zip(gpu, cpu):
        assert la.cpu().tolist() == lb.tolist()
        levels.append(((a.cpu().float() - b) * std).abs().mean().item())
    assert levels and sum(levels) / len(levels) <= 0.5, levels


def test_a_truncated_jpeg_is_named_before_any_decoder_sees_it(tmp_path):
    """nvJPEG may decode a JPEG cut mid-scan without an error; the feed looks for the
    end-of-image marker after the first scan, so the file is named on the GPU as on the CPU."""
    import io
    rng = np.random.default_rng(0)

    def jpeg(size, **kw):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(out, "JPEG", **kw)
        return out.getvalue()

    whole, progressive = jpeg((64, 80)), jpeg((64, 80), progressive=True)
    thumbnail = jpeg((8, 8))
    app1 = b"Exif\x00\x00" + thumbnail          # an EXIF thumbnail: its own end marker
    with_thumb = whole[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + whole[2:]
    out = io.BytesIO()
    Image.new("RGB", (5, 5)).save(out, "PNG")
    assert not any(dali.jpeg_is_truncated(d) for d in (
        whole, progressive, with_thumb, whole + b"trailing camera data", out.getvalue()))
    assert all(dali.jpeg_is_truncated(d) for d in (
        whole[:len(whole) // 2], progressive[:len(progressive) * 2 // 3],
        with_thumb[:len(with_thumb) - 200], whole[:100]))
    root = write_jpeg_folder(tmp_path / "data", per_class=2, splits=("train",))
    path = root / "train" / "a_cls" / "a_cls_001.JPEG"
    path.write_bytes(path.read_bytes()[:-300])
    loader = build_loader(cfg_for(root, "dali", image_size=32, on_bad_image="stop"),
                          LoaderSpec("train", batch_size=2))
    from pipelines.torch_backend import CorruptImageError
    with pytest.raises(CorruptImageError, match=r"a_cls_001.JPEG \(truncated: the JPEG ends"):
        list(loader)


FORKED_CHILD = """
import gc, os, sys
from pipelines import DataConfig, LoaderSpec, build_loader
loader = build_loader(DataConfig(root=sys.argv[1], backend="dali", workers=1, image_size=32),
                      LoaderSpec("train", batch_size=4))
batches = iter(loader)
next(batches)                       # a live pipeline, held by a suspended generator
pid = os.fork()                     # what a torch DataLoader worker or a verify pool does
if pid == 0:
    del batches
    gc.collect()                    # the parent's pipeline is collected in the child
    os._exit(0)
print("child", os.waitpid(pid, 0)[1])
"""


def test_a_forked_child_lets_go_of_its_parents_pipelines(folder):
    """A DALI pipeline garbage-collected in a forked child (a DataLoader worker started after a
    DALI loader ran in the same process) waited forever for threads the child does not have."""
    import subprocess
    import sys
    from trainer_utils import REPO
    proc = subprocess.run([sys.executable, "-c", FORKED_CHILD, str(folder)], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and "child 0" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.skipif(sys.version_info >= (3, 11, 10) or sys.platform != "linux",
                    reason="CPython 3.11.10 fixed the fork deadlock (gh-112275): workers fork")
def test_a_rank_starts_torch_workers_from_a_fork_server_with_the_same_batches(folder, tmp_path):
    """In a process with a process group, the torch backend's workers come from the fork server
    (a fork beside gloo's threads can deadlock the child); the batches are those of forked
    workers, epoch for epoch."""
    import torch.distributed as dist
    from pipelines import torch_backend
    cfg = DataConfig(root=str(folder), backend="torch", workers=2, image_size=32)

    def two_epochs():
        loader = build_loader(cfg, LoaderSpec("train", batch_size=8, seed=3))
        epochs = []
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            epochs.append(list(loader))
        return epochs

    assert torch_backend.worker_start(2) is None      # no process group: plain fork
    forked = two_epochs()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        assert torch_backend.worker_start(0) is None
        assert torch_backend.worker_start(2).get_start_method() == "forkserver"
        served = two_epochs()
    finally:
        dist.destroy_process_group()
    assert len(forked) == len(served) == 2 and forked[0] and forked[1]
    for epoch_f, epoch_s in zip(forked, served):
        assert len(epoch_f) == len(epoch_s)
        for (xf, yf), (xs, ys) in zip(epoch_f, epoch_s):
            assert torch.equal(xf, xs) and torch.equal(yf, ys)
    assert not torch.equal(forked[0][0][0], forked[1][0][0])  # the epochs differ
