from tests.fixtures.proxy import fault_proxy  # noqa: F401
from tests.fixtures.registry import registry, registry_session  # noqa: F401
