from pydantic import Field

from ftps.common.settings import CommonSettings


class WorkerSettings(CommonSettings):
    listen: str = Field("127.0.0.1:50054", description="host:port to serve on")
    device: str = Field("auto", description="torch device: auto (cuda when present), cpu or cuda")
    max_concurrent_jobs: int = Field(1, description="jobs run at once; more wait their turn")
    job_timeout_s: float = Field(1800.0, description="wall-time limit of one job's sandbox")
    job_memory_mb: int = Field(8192, description="address-space limit of one job's sandbox, MiB")
    blob_cache_mb: int = Field(1024, description="in-memory cache of task blobs, by sha256, MiB")
    worker_id: str = Field("", description="name reported by GetInfo (default: hostname:port)")
