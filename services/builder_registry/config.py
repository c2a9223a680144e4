from pydantic import Field

from ftps.common.settings import CommonSettings


class RegistrySettings(CommonSettings):
    listen: str = Field("127.0.0.1:50052", description="host:port to serve on")
    max_base_model_mb: int = Field(512, description="largest base model upload, MiB")
    max_strategy_kb: int = Field(256, description="largest strategy script upload, KiB")
    max_builder_data_mb: int = Field(1024, description="largest builder data upload, MiB")
