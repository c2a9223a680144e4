from pydantic import Field

from ftps.common.settings import CommonSettings, DatabaseSettings


class ScorerSettings(CommonSettings, DatabaseSettings):
    listen: str = Field("127.0.0.1:50053", description="host:port to serve on")
    registry_addr: str = Field("127.0.0.1:50052", description="builder registry target")
    worker_addrs: str = Field("127.0.0.1:50054",
                              description="fine-tune workers: comma-separated targets, or one "
                                          "dns:///name:port target balanced round-robin")
    jobs_per_worker: int = Field(1, description="jobs in flight per worker target")
    job_timeout_s: float = Field(3600.0, description="deadline of one worker job")
    job_attempts: int = Field(4, description="tries of one job across workers when one is unavailable")
    heldout_max: int = Field(500, description="held-out builder records the offline Gaussian is fitted on")
    replica_id: str = Field("", description="this scorer replica's name in round leases, unique among the "
                            "replicas sharing a database; empty: hostname-pid")
    round_lease_s: float = Field(30.0, gt=0, description="a round's lease, seconds: its replica renews it "
                                 "every third of it; another replica takes the round over once it runs out")
