"""Models by config: `build(cfg.model)` returns a FunctionalModel."""
from jaxlm.models.functional import FunctionalModel, build
