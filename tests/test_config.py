"""Settings from the environment: defaults, and bad values named at start-up."""
from __future__ import annotations

import pytest

from aadrun.config import Settings
from aadrun.errors import ConfigError
from tests.support.serve import FunctionServer


def test_defaults_follow_the_contract():
    settings = Settings.from_env({})
    assert (settings.policy_path, settings.store_url, settings.bus, settings.iam_mode) == (
        "policies/", "sqlite:///.aadrun/state.db", "local", "record")
    assert settings.authority_url == "https://login.microsoftonline.com"
    assert settings.graph_url == "https://graph.microsoft.com/v1.0"
    assert settings.client_states == ()


def test_client_state_is_a_comma_separated_list_and_never_shown():
    settings = Settings.from_env({"AADRUN_CLIENT_STATE": " old-secret , new-secret ",
                                  "AADRUN_CLIENT_SECRET": "app-secret"})
    assert settings.client_states == ("old-secret", "new-secret")
    shown = repr(settings)
    assert "old-secret" not in shown and "new-secret" not in shown and "app-secret" not in shown


def test_a_client_state_graph_would_refuse_stops_start_up_without_showing_it():
    secret = "s" * 129                         # Graph takes at most 128 characters
    assert Settings.from_env({"AADRUN_CLIENT_STATE": f"ok,{secret[:-1]}"}).client_states[1] == secret[:-1]
    with pytest.raises(ConfigError, match="AADRUN_CLIENT_STATE") as refused:
        Settings.from_env({"AADRUN_CLIENT_STATE": f"ok,{secret}"})
    assert secret not in str(refused.value)


@pytest.mark.parametrize("env, variable", [
    ({"AADRUN_BUS": "kafka"}, "AADRUN_BUS"),
    ({"AADRUN_IAM": "gcp"}, "AADRUN_IAM"),
    ({"AADRUN_AUTHORITY_URL": "http://login.example.com"}, "AADRUN_AUTHORITY_URL"),
    ({"AADRUN_GRAPH_URL": "ftp://127.0.0.1/v1.0"}, "AADRUN_GRAPH_URL"),
    ({"AADRUN_CLOUDRUN_ENDPOINT": "http://10.0.0.1:8080"}, "AADRUN_CLOUDRUN_ENDPOINT"),
    ({"AADRUN_NOTIFICATION_URL": "http://hooks.example.com/"}, "AADRUN_NOTIFICATION_URL"),
    ({"AADRUN_LEEWAY_SECONDS": "a minute"}, "AADRUN_LEEWAY_SECONDS"),
    ({"AADRUN_LEEWAY_SECONDS": "-5"}, "AADRUN_LEEWAY_SECONDS"),
    ({"AADRUN_LEEWAY_SECONDS": "nan"}, "AADRUN_LEEWAY_SECONDS"),      # exp + nan: every check would pass
    ({"AADRUN_JWKS_REFRESH_SECONDS": "inf"}, "AADRUN_JWKS_REFRESH_SECONDS"),
    ({"AADRUN_JWKS_REFRESH_SECONDS": "0"}, "AADRUN_JWKS_REFRESH_SECONDS"),    # a fetch for every request
    ({"AADRUN_LEEWAY_SECONDS": "1e308"}, "AADRUN_LEEWAY_SECONDS"),    # as good as no expiry
    ({"AADRUN_MEMBERSHIP_POLL_SECONDS": "3600"}, "AADRUN_MEMBERSHIP_POLL_SECONDS"),
    ({"AADRUN_BUS": "pubsub"}, "GOOGLE_CLOUD_PROJECT"),
    ({"AADRUN_STORE": "postgres://db/aadrun"}, "AADRUN_STORE"),
    ({"AADRUN_STORE": "sqlite://state.db"}, "AADRUN_STORE"),
    ({"AADRUN_STORE": "sqlite:///"}, "AADRUN_STORE"),                 # no file named
    ({"AADRUN_TOPIC_CHANGES": "projects/p/topics/changes"}, "AADRUN_TOPIC_CHANGES"),   # a path, not an id
    ({"AADRUN_TOPIC_POLICY": "bad topic!"}, "AADRUN_TOPIC_POLICY"),
    ({"AADRUN_TOPIC_POLICY": "goog-updates"}, "AADRUN_TOPIC_POLICY"),  # Google's own prefix
    ({"AADRUN_CLIENT_STATE": ",,, "}, "AADRUN_CLIENT_STATE"),          # set, but no secret in it
    ({"AADRUN_CLIENT_STATE": "\n"}, "AADRUN_CLIENT_STATE"),            # a secret version made by `echo |`
    ({"REQUESTS_CA_BUNDLE": "/nonexistent/ca.pem"}, "REQUESTS_CA_BUNDLE"),  # every outbound call would fail
    ({"SSL_CERT_FILE": "/nonexistent/ca.pem"}, "SSL_CERT_FILE"),
    ({"REQUESTS_CA_BUNDLE": "/dev/null"}, "REQUESTS_CA_BUNDLE"),     # readable, and no certificate in it
    ({"REQUESTS_CA_BUNDLE": __file__}, "REQUESTS_CA_BUNDLE"),         # a file, not PEM
    # urlsplit drops what a URL must not hold; the URL itself is used as it was given.
    ({"AADRUN_AUTHORITY_URL": "https://login.microsoftonline.com "}, "AADRUN_AUTHORITY_URL"),
    ({"AADRUN_NOTIFICATION_URL": "https://hooks.example.com/graph_webhook\n"}, "AADRUN_NOTIFICATION_URL"),
    ({"AADRUN_GRAPH_URL": "https://graph.micro\tsoft.com/v1.0"}, "AADRUN_GRAPH_URL"),
    ({"AADRUN_AUTHORITY_URL": "https://login.microsoftonline.com:99999"}, "AADRUN_AUTHORITY_URL"),
    ({"AADRUN_AUTHORITY_URL": "https://login.microsoftonline.com:443x"}, "AADRUN_AUTHORITY_URL"),
    # Paths are appended to these: {url}/lifecycle, {authority}/{tenant}/...
    ({"AADRUN_NOTIFICATION_URL": "https://hooks.example.com/graph_webhook?code=1"}, "AADRUN_NOTIFICATION_URL"),
    ({"AADRUN_CLOUDRUN_ENDPOINT": "https://run.googleapis.com#x"}, "AADRUN_CLOUDRUN_ENDPOINT"),
    ({"AADRUN_GRAPH_URL": "https://graph.microsoft.com/v1.0?"}, "AADRUN_GRAPH_URL"),
    ({"AADRUN_BUS": "pubsub", "GOOGLE_CLOUD_PROJECT": "  "}, "GOOGLE_CLOUD_PROJECT"),   # blanks are unset
    ({"AADRUN_CLIENT_ID": "aadrun-app"}, "AADRUN_CLIENT_ID"),          # a name, not the app's GUID
    ({"AADRUN_CLIENT_ID": "c11e47a0-0000-0000-0000-00000000b11"}, "AADRUN_CLIENT_ID"),   # a digit short
])
def test_bad_values_name_the_variable(env, variable):
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env(env)


@pytest.mark.parametrize("url", ["https://app:s3cret@graph.microsoft.com/v1.0",
                                 "https://app:s3cret@graph.microsoft.com/v1.0\n"])   # and another fault
def test_a_url_with_credentials_is_refused_without_showing_them(url):
    with pytest.raises(ConfigError, match="AADRUN_GRAPH_URL") as refused:
        Settings.from_env({"AADRUN_GRAPH_URL": url})
    assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize("url", ["https://hooks.example.com/api/hook?code=s3cret",
                                 "https://hooks.example.com/api/hook#s3cret?x",
                                 "https://hooks.example.com/api/hook?code=s3cret\n",     # and another fault
                                 "https://hooks.example.com:99999/api/hook?code=s3cret",
                                 "ftp://hooks.example.com/api/hook?code=s3cret"])
def test_a_url_s_query_is_not_shown_it_may_hold_a_key(url):
    with pytest.raises(ConfigError, match="AADRUN_NOTIFICATION_URL") as refused:
        Settings.from_env({"AADRUN_NOTIFICATION_URL": url})
    assert "s3cret" not in str(refused.value)
    assert "hooks.example.com" in str(refused.value) and "query or fragment not shown" in str(refused.value)


def test_a_client_id_pasted_into_the_wrong_variable_is_not_shown():
    # A secret where the client id belongs: named, not echoed into the start-up log.
    with pytest.raises(ConfigError, match="AADRUN_CLIENT_ID") as refused:
        Settings.from_env({"AADRUN_CLIENT_ID": "Xy7Q~s3cret.value"})
    assert "s3cret" not in str(refused.value)
    assert Settings.from_env({"AADRUN_CLIENT_ID": " C11E47A0-0000-0000-0000-00000000B111\n"}).client_id == \
        "C11E47A0-0000-0000-0000-00000000B111"


def test_blank_values_are_unset_and_surrounding_blanks_dropped():
    # A secret version made with `echo` ends in a newline.
    settings = Settings.from_env({"AADRUN_CLIENT_ID": "  ", "AADRUN_CLIENT_SECRET": "app-secret\n",
                                  "GOOGLE_CLOUD_PROJECT": " aadrun-prod "})
    assert (settings.client_id, settings.client_secret, settings.project) == (None, "app-secret", "aadrun-prod")


def test_a_pem_bundle_or_a_folder_for_requests_is_taken(tmp_path):
    import certifi

    assert Settings.from_env({"SSL_CERT_FILE": certifi.where()}).ca_file == certifi.where()
    assert Settings.from_env({"REQUESTS_CA_BUNDLE": str(tmp_path)}).ca_file == str(tmp_path)
    assert Settings.from_env({"SSL_CERT_FILE": str(tmp_path)}).ca_file == str(tmp_path)


def test_plain_http_only_towards_loopback():
    settings = Settings.from_env({"AADRUN_AUTHORITY_URL": "http://127.0.0.1:8443/",
                                  "AADRUN_CLOUDRUN_ENDPOINT": "http://localhost:9000"})
    assert settings.authority_url == "http://127.0.0.1:8443"
    assert settings.cloudrun_endpoint == "http://localhost:9000"


def test_a_function_with_bad_configuration_stops_at_start_up_naming_the_variable():
    with pytest.raises(RuntimeError) as stopped:
        FunctionServer("verify", {"AADRUN_BUS": "kafka"}).start(timeout=30)
    message = str(stopped.value)
    assert "AADRUN_BUS must be one of local, pubsub" in message and "Traceback" not in message
