"""Collection of analytics events, as in ``zenml.analytics.enums``.

``AnalyticsEvent`` holds exactly the events of the seed reference.
``LegacyAnalyticsEvent`` holds the older events of ZenML's usage-analytics page
that the newer list dropped; they are tracked the same way.
"""

from __future__ import annotations

from enum import Enum


class AnalyticsEvent(str, Enum):
    """Enum of events to track in segment."""

    BUILD_PIPELINE = "Pipeline built"
    CREATED_FLAVOR = "Flavor created"
    CREATED_MODEL = "Model created"
    CREATED_MODEL_VERSION = "Model Version created"
    CREATED_RUN_TEMPLATE = "Run template created"
    CREATED_SECRET = "Secret created"
    CREATED_SERVICE_ACCOUNT = "Service account created"
    CREATED_SERVICE_CONNECTOR = "Service connector created"
    CREATED_TAG = "Tag created"
    CREATED_TRIGGER = "Trigger created"
    CREATED_WORKSPACE = "Workspace created"
    CREATE_PIPELINE = "Pipeline created"
    DEPLOY_FULL_STACK = "Full stack deployed"
    DEPLOY_STACK = "Stack deployed"
    DEPLOY_STACK_COMPONENT = "Stack component deployed"
    DESTROY_STACK = "Stack destroyed"
    DESTROY_STACK_COMPONENT = "Stack component destroyed"
    DEVICE_VERIFIED = "Device verified"
    EXECUTED_RUN_TEMPLATE = "Run templated executed"
    GENERATE_TEMPLATE = "Template generated"
    MODEL_DEPLOYED = "Model deployed"
    OPT_IN_ANALYTICS = "Analytics opt-in"
    OPT_IN_OUT_EMAIL = "Response for Email prompt"
    OPT_OUT_ANALYTICS = "Analytics opt-out"
    REGISTERED_CODE_REPOSITORY = "Code repository registered"
    REGISTERED_STACK = "Stack registered"
    REGISTERED_STACK_COMPONENT = "Stack component registered"
    RUN_PIPELINE = "Pipeline run"
    RUN_PIPELINE_ENDED = "Pipeline run ended"
    RUN_STACK_RECIPE = "Stack recipe ran"
    RUN_ZENML_GO = "ZenML go"
    SERVER_SETTINGS_UPDATED = "Server Settings Updated"
    UPDATED_STACK = "Stack updated"
    UPDATED_TRIGGER = "Trigger updated"
    USER_ENRICHED = "User Enriched"
    ZENML_SERVER_DEPLOYED = "ZenML server deployed"
    ZENML_SERVER_DESTROYED = "ZenML server destroyed"


class LegacyAnalyticsEvent(str, Enum):
    """Events of ZenML's older event list that ``AnalyticsEvent`` no longer has."""

    GET_PIPELINES = "Pipelines fetched"
    GET_PIPELINE = "Pipeline fetched"
    INITIALIZE_REPO = "ZenML initialized"
    INITIALIZED_PROFILE = "Profile initialized"
    UPDATED_STACK_COMPONENT = "Stack component updated"
    COPIED_STACK_COMPONENT = "Stack component copied"
    REGISTERED_DEFAULT_STACK = "Default stack registered"
    SET_STACK = "Stack set"
    COPIED_STACK = "Stack copied"
    IMPORT_STACK = "Stack imported"
    EXPORT_STACK = "Stack exported"
    RUN_EXAMPLE = "Example run"
    PULL_EXAMPLE = "Example pull"
    INSTALL_INTEGRATION = "Integration installed"
    CREATED_USER = "User created"
    CREATED_DEFAULT_USER = "Default user created"
    DELETED_USER = "User deleted"
    CREATED_TEAM = "Team created"
    DELETED_TEAM = "Team deleted"
    CREATED_PROJECT = "Project created"
    DELETED_PROJECT = "Project deleted"
    CREATED_ROLE = "Role created"
    DELETED_ROLE = "Role deleted"
    EVENT_TEST = "Test event"
    PULL_STACK_RECIPE = "Stack recipes pulled"
    DESTROY_STACK_RECIPE = "Stack recipe destroyed"


CONSENT_EVENTS = frozenset({AnalyticsEvent.OPT_IN_ANALYTICS, AnalyticsEvent.OPT_OUT_ANALYTICS})
"""Events sent whatever the user's consent, as ZenML does."""
