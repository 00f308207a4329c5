"""The embedded benchmark suite: eight tasks, a CLIP-like ViT, the protocol, the report.

    from mergejax.suite import protocol
    suite = protocol.build_suite(protocol.ProtocolConfig(), cache_dir="cache/suite")
    suite.accuracies(mergejax.linear(None, suite.experts))

Modules: `tasks` (data that ships in packages), `datasets` (TFDS builder and reader),
`model` (the ViT and cosine heads), `protocol` (pretrain, heads, experts, cache),
`benchmark` (run registered methods), `report` (tables and files).
"""

from mergejax.suite import benchmark, datasets, model, protocol, report, tasks

__all__ = ["benchmark", "datasets", "model", "protocol", "report", "tasks"]
