from pydantic import Field

from ftps.common.settings import CommonSettings, DatabaseSettings


class RegistrySettings(CommonSettings, DatabaseSettings):
    listen: str = Field("127.0.0.1:50052", description="host:port to serve on")
    max_base_model_mb: int = Field(512, description="largest base model upload, MiB")
    max_strategy_kb: int = Field(256, description="largest strategy script upload, KiB")
    max_builder_data_mb: int = Field(1024, description="largest builder data upload, MiB")
    max_expanded_mb: int = Field(512, gt=0, description="most an uploaded archive may hold uncompressed, MiB: the "
                                 "builder data npz's members together (checked on their headers before any is "
                                 "inflated, so a small zip bomb is refused unread) and a base model's tensors; "
                                 "validating one upload takes up to about twice this in memory, besides the "
                                 "upload itself")
    worker_addrs: str = Field("", description="fine-tune workers (comma-separated host:port, or one dns:///name:port) "
                              "that check an uploaded base model against its strategy in their sandbox; "
                              "empty: no check (a mismatch then fails at round time)")
    check_timeout_s: float = Field(300, description="deadline of one model check, seconds")
