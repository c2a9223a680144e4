from pydantic import Field

from ftps.common.settings import CommonSettings


class GatewaySettings(CommonSettings):
    listen: str = Field("127.0.0.1:50051", description="host:port to serve on")
    registry_addr: str = Field("127.0.0.1:50052", description="builder registry target")
    scorer_addr: str = Field("127.0.0.1:50053", description="LiRA scorer target")
    max_records_per_request: int = Field(10_000, description="records accepted in one submit")
    max_pending_per_contributor: int = Field(100_000, description="records one contributor may have waiting")
    task_cache_s: float = Field(30.0, description="keep a task's settings this long instead of asking the "
                                "registry on every submit (settings and owner never change); 0: always ask")
