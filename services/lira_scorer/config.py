from pydantic import Field

from ftps.common.settings import CommonSettings


class ScorerSettings(CommonSettings):
    listen: str = Field("127.0.0.1:50053", description="host:port to serve on")
    registry_addr: str = Field("127.0.0.1:50052", description="builder registry target")
    worker_addrs: str = Field("127.0.0.1:50054",
                              description="fine-tune workers: comma-separated targets, or one "
                                          "dns:///name:port target balanced round-robin")
    jobs_per_worker: int = Field(1, description="jobs in flight per worker target")
    job_timeout_s: float = Field(3600.0, description="deadline of one worker job")
    job_attempts: int = Field(4, description="tries of one job across workers when one is unavailable")
    heldout_max: int = Field(500, description="held-out builder records the offline Gaussian is fitted on")
