from pydantic import Field

from ftps.common.settings import CommonSettings, DatabaseSettings


class GatewaySettings(CommonSettings, DatabaseSettings):
    listen: str = Field("127.0.0.1:50051", description="host:port to serve on")
    registry_addr: str = Field("127.0.0.1:50052", description="builder registry target")
    scorer_addr: str = Field("127.0.0.1:50053", description="LiRA scorer target")
    max_records_per_request: int = Field(10_000, description="records accepted in one submit")
    max_pending_per_contributor: int = Field(100_000, description="records one contributor may have waiting")
    task_cache_s: float = Field(30.0, description="keep a task's settings this long instead of asking the "
                                "registry on every submit (settings and owner never change); 0: always ask")
    reconcile_s: float = Field(1.0, gt=0, description="how often each replica asks the scorer about rounds "
                               "holding submissions, seconds (their outcome is applied once they end)")
    round_grace_s: float = Field(300.0, gt=0, description="a round the scorer does not know this long after "
                                 "it was claimed (the gateway died before starting it) gives its records "
                                 "back to the queue, seconds; longer than a StartRound call may take")
