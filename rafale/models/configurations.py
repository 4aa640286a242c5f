"""Model sizes. Each family has a table of presets ("flavors"); a config picks one by name with
`model.preset` and may override any field. The real sizes follow the published checkpoints; the tiny ones
train in minutes on a laptop CPU and are what the tests and `DEBUG=1` use."""

from rafale.models.decoder import DecoderConfig
from rafale.models.encoder import EncoderConfig

PYTHIA_PRESETS = {
    # tiny: the CPU default and the test fixture (vocab_size None: taken from the tokenizer)
    "pythia-tiny": DecoderConfig(
        hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512, max_position_embeddings=512, vocab_size=None
    ),
    "pythia-debug": DecoderConfig(
        hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, max_position_embeddings=256, vocab_size=None
    ),
    # EleutherAI/pythia-70m and -160m (config.json on the hub)
    "pythia-70m": DecoderConfig(
        vocab_size=50304, hidden_size=512, num_layers=6, num_heads=8, intermediate_size=2048
    ),
    "pythia-160m": DecoderConfig(
        vocab_size=50304, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072
    ),
}

BERT_PRESETS = {
    # tiny: the CPU default and the test fixture (vocab_size None: taken from the tokenizer)
    "bert-tiny": EncoderConfig(
        family="bert", hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512,
        max_position_embeddings=512, vocab_size=None,
    ),
    # bert-base-uncased (config.json on the hub)
    "bert-base": EncoderConfig(
        family="bert", vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
        max_position_embeddings=512, type_vocab_size=2,
    ),
}

ROBERTA_PRESETS = {
    # RoBERTa's position table has 2 extra rows (pad id 1 and below are never a real token's position),
    # so 514 rows give max_seq_len 512
    "roberta-tiny": EncoderConfig(
        family="roberta", hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512,
        max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, position_offset=2,
        vocab_size=None,
    ),
    # FacebookAI/roberta-base (config.json on the hub)
    "roberta-base": EncoderConfig(
        family="roberta", vocab_size=50265, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
        max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, position_offset=2,
    ),
}

# model.type -> its presets; rafale.main.model_config_dict has a builder for each of these types
PRESETS = {
    "pythia": PYTHIA_PRESETS,
    "bert": BERT_PRESETS,
    "roberta": ROBERTA_PRESETS,
}
# model.type -> the tasks it trains for (model.task); the first is the default
TASKS = {
    "pythia": ("causal_lm",),
    "bert": ("mlm", "classification"),
    "roberta": ("mlm", "classification"),
}
MODEL_FAMILIES = tuple(PRESETS)
