"""What the web process repeats of the workers' adapters (it may not import them) agrees with them."""

from __future__ import annotations

import typing

from imagegate.app.model_catalog import BUILT_IN_ADAPTERS
from imagegate.app.read_schemas import TaskListQuery
from imagegate.app.state.tasks import TaskStatus
from imagegate.workers.adapters import load_adapters


def test_the_catalog_knows_every_built_in_adapter_as_it_declares_itself():
    adapters = load_adapters()
    assert set(BUILT_IN_ADAPTERS) <= set(adapters)
    for name, traits in BUILT_IN_ADAPTERS.items():
        capabilities = adapters[name].capabilities
        assert (traits.polling, traits.max_images_per_call) == (
            capabilities.polling,
            capabilities.max_images_per_call,
        ), name


def test_the_list_filter_takes_every_task_status():
    (literal, _none) = typing.get_args(TaskListQuery.model_fields["status"].annotation)
    assert set(typing.get_args(literal)) == set(TaskStatus)
