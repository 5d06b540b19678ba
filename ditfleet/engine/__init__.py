"""Generation engine: encode -> denoise -> decode -> write, for one request or a jobs file.

Public API::

    from ditfleet.engine import Engine                     # workers started once (local | torchrun | ray)
    with Engine.start(cfg, launcher="local") as engine:    # every component loaded once
        result = engine.generate(prompt="a cat", output="cat.mp4")
        pipe = engine.pipeline                             # a local engine's components (Pipeline)
        latents = pipe.runner.denoise(pipe.encode(request))  # the per-rank pieces; EncodedRequest: plain tensors

Modules: :mod:`.engine` (Engine), :mod:`.executor` (Local / worker-method list), :mod:`.worker`,
:mod:`.ray_executor`, :mod:`.torchrun`, :mod:`.sparge_weights`, :mod:`.sampler` (flow UniPC / Euler, pure tensors), :mod:`.encoders` (UMT5, CLIP),
:mod:`.vae` (conditioning, streamed decode), :mod:`.runner` (DiT + CFG + sampler per rank),
:mod:`.pipeline`, :mod:`.video` (atomic streaming writers), :mod:`.jobs`, :mod:`.tiny` (the
embedded random model), :mod:`.generate_cli` (``ditfleet generate``).
"""

from .engine import Engine
from .errors import ImageError, JobsFileError, ModelFolderError, OutputError, RequestError
from .jobs import Job, JobsSummary, parse_jobs, run_jobs
from .pipeline import DEFAULT_PROMPT, GenerateResult, Pipeline, check_model_folder, load_image, request_from_config
from .request import EncodedRequest, GenerateRequest
from .runner import ModelRunner, initial_noise
from .sampler import EulerSampler, FlowSchedule, UniPCSampler, make_sampler, make_schedule
from .encoders import DEFAULT_NEGATIVE_PROMPT
from .executor import WORKER_METHODS, EngineError, Executor, LocalExecutor, make_executor
from .sparge_weights import SpargeCheckpointError, load_sparge_weights, validate_sparge_weights
from .worker import Worker
from .tiny import TINY_SPEC, build_components, tiny_model_path
from .video import VideoWriter, output_kind, read_video, report_path

__all__ = [
    "DEFAULT_NEGATIVE_PROMPT",
    "DEFAULT_PROMPT",
    "TINY_SPEC",
    "EncodedRequest",
    "Engine",
    "EngineError",
    "Executor",
    "LocalExecutor",
    "SpargeCheckpointError",
    "WORKER_METHODS",
    "Worker",
    "EulerSampler",
    "FlowSchedule",
    "GenerateRequest",
    "GenerateResult",
    "ImageError",
    "Job",
    "JobsFileError",
    "JobsSummary",
    "ModelFolderError",
    "ModelRunner",
    "OutputError",
    "Pipeline",
    "RequestError",
    "UniPCSampler",
    "VideoWriter",
    "build_components",
    "check_model_folder",
    "initial_noise",
    "load_image",
    "load_sparge_weights",
    "make_executor",
    "make_sampler",
    "make_schedule",
    "output_kind",
    "parse_jobs",
    "read_video",
    "report_path",
    "request_from_config",
    "run_jobs",
    "tiny_model_path",
    "validate_sparge_weights",
]
