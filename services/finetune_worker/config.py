from pydantic import Field

from ftps.common.settings import CommonSettings


class WorkerSettings(CommonSettings):
    listen: str = Field("127.0.0.1:50054", description="host:port to serve on")
    device: str = Field("auto", description="torch device: auto (cuda when present), cpu or cuda")
    engine: str = Field("auto", description="how a job's models train: auto (the rule of "
                        "ftps/ml/engines.py: one after another on CPU, stacked on CUDA), "
                        "sequential or stacked")
    precision: str = Field("auto", description="precision of the training steps: auto (the rule of "
                           "ftps/ml/engines.py: bf16 autocast on CUDA with bfloat16 support, fp32 "
                           "elsewhere and for DP-SGD), fp32 or bf16; phi is float32 either way")
    max_concurrent_jobs: int = Field(1, description="jobs run at once; more wait their turn")
    job_threads: int = Field(0, ge=0, description="torch threads of each job; 0: $FTPS_TORCH_THREADS, else the "
                               "CPUs this worker may use divided by max_concurrent_jobs (on small models "
                               "concurrent jobs beat threads: README, Results)")
    job_timeout_s: float = Field(1800.0, description="wall-time limit of one job's sandbox")
    job_memory_mb: int = Field(8192, description="address-space limit of one job's sandbox, MiB")
    warm_sandboxes: bool = Field(True, description="reuse a sandbox child for the jobs of one "
                                 "task (no torch start-up per job); off: a fresh child per job")
    sandbox_idle_s: float = Field(300.0, description="a warm sandbox child idle this long exits")
    sandbox_max_jobs: int = Field(64, description="jobs one warm sandbox child serves before "
                                  "it is replaced")
    spare_sandbox: bool = Field(True, description="keep one started, unused sandbox child so "
                                "the first job of a new task does not wait for torch to import")
    blob_cache_mb: int = Field(1024, description="in-memory cache of task blobs, by sha256, MiB")
    worker_id: str = Field("", description="name reported by GetInfo (default: hostname:port)")
    max_connection_age_s: float = Field(300.0, description="close each client connection after this long "
                                        "(jobs in flight finish first), so that clients re-resolve "
                                        "dns:/// targets and spread over worker pods added since; 0: never")
