"""What `mf-loss train` needs of a valid configuration beyond the loader's checks (no MindSpore import)."""
from ..config_loader import Config, ConfigError

UNFUSED_LOSS, FUSED_LOSS = "CrossEntropyLoss", "LinearCrossEntropyLoss"


def fused_head(config: Config) -> bool:
    """The loss block's type picks the head: LinearCrossEntropyLoss takes the hidden state and the head
    rows (the logits never exist), CrossEntropyLoss takes the logits slice the model makes."""
    return config["loss"]["type"] == FUSED_LOSS


def check_trainable(config: Config) -> None:
    """The exact per-token loss, one loss output, and a head the model can feed."""
    loss, source = config["loss"], config.source
    if loss["type"] not in (UNFUSED_LOSS, FUSED_LOSS):
        raise ConfigError(f"{source}: loss.type: mf-loss train trains with {FUSED_LOSS} (fused head) or "
                          f"{UNFUSED_LOSS} (unfused), got {loss['type']!r}")
    if not loss.get("calculate_per_token_loss", False):
        raise ConfigError(f"{source}: loss.calculate_per_token_loss: mf-loss train needs true (sums of token "
                          "losses and token counts, divided once by the global count: the exact global token mean)")
    if loss.get("return_z_loss", False):
        raise ConfigError(f"{source}: loss.return_z_loss: not supported by mf-loss train; set it to false")
    if loss.get("complete_hidden_grad"):
        raise ConfigError(f"{source}: loss.complete_hidden_grad: the model's copy-to-model-parallel op already sums "
                          "the hidden state's gradient over the model-parallel ranks; the training job passes false. "
                          "Remove the key")
