"""Search spaces of contrastive-study: shipped YAML files and the small API that loads and samples them."""

from search_spaces.space import Param, SearchSpace, SpaceError, load_space, parse_space

__all__ = ["Param", "SearchSpace", "SpaceError", "load_space", "parse_space"]
