"""An EHR for the tests: an OAuth 2 / OpenID Connect authorization server built with authlib
(authorization code + PKCE S256, refresh, SMART launch context, id_token RS256 with a
JWKS) and a small FHIR R4 server (Patient, Practitioner, ImagingStudy, DiagnosticReport).

It serves on a free loopback port from a thread. Its ``chart`` page is what a clinician
sees in the EMR: an "emix" link that starts an EHR launch, one per imaging study too.
Knobs (``id_token_mode``, ``omit_patient``, ``capabilities``) make it misbehave on purpose.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oidc.core.grants import OpenIDCode
from flask import Flask, abort, jsonify, request
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

PRACTITIONER = "dr-lake"
PATIENT = "pat-1"
DCM = "http://dicom.nema.org/resources/ontology/DCM"


@dataclass
class Client:
    """A registered SMART app (emix)."""

    client_id: str
    redirect_uri: str
    secret: str = ""
    auth_method: str = "client_secret_basic"
    public_jwk: dict[str, Any] | None = None

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_allowed_scope(self, scope: str) -> str:
        return scope

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri == self.redirect_uri

    def check_client_secret(self, client_secret: str) -> bool:
        return bool(self.secret) and secrets.compare_digest(client_secret, self.secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return endpoint != "token" or method == self.auth_method

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in ("authorization_code", "refresh_token")


@dataclass
class Code:
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    user: str
    context: dict[str, Any]
    code_challenge: str | None
    code_challenge_method: str | None
    nonce: str | None
    auth_time: int = field(default_factory=lambda: int(time.time()))

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.auth_time

    def get_acr(self) -> None:
        return None

    def get_amr(self) -> None:
        return None


class RefreshCredential(dict):  # type: ignore[type-arg]
    """A refresh token the EHR issued, with what authlib asks of it."""

    def check_client(self, client: Any) -> bool:
        return bool(self["client_id"] == client.client_id)

    def get_scope(self) -> str:
        return str(self["scope"])

    def get_user(self) -> str:
        return str(self["user"])


class EhrSimulator:
    """The EHR: ``base`` is its root, ``fhir_base`` the ``iss`` it launches apps with."""

    def __init__(self) -> None:
        self.key = RSAKey.generate_key(2048, parameters={"kid": "ehr-1", "use": "sig"})
        self.other_key = RSAKey.generate_key(2048, parameters={"kid": "ehr-1", "use": "sig"})
        self.clients: dict[str, Client] = {}
        self.codes: dict[str, Code] = {}
        self.tokens: dict[str, dict[str, Any]] = {}
        self.refresh_tokens: dict[str, dict[str, Any]] = {}
        self.launches: dict[str, dict[str, Any]] = {}
        self.used_codes: list[str] = []
        self.token_requests: list[dict[str, Any]] = []
        self.authorize_requests: list[dict[str, Any]] = []
        #: "ok", "wrong_aud", "bad_signature", "expired"
        self.id_token_mode = "ok"
        self.omit_patient = False
        #: where the id_token's fhirUser points (default: this FHIR server)
        self.fhir_user_base = ""
        self.capabilities = [
            "launch-ehr",
            "launch-standalone",
            "client-public",
            "client-confidential-symmetric",
            "client-confidential-asymmetric",
            "context-ehr-patient",
            "context-standalone-patient",
            "permission-v2",
            "permission-v1",
            "sso-openid-connect",
        ]
        self.access_ttl = 3600
        self.resources = sample_resources()
        self.app = self._make_app()
        self.port = 0
        self._server: Any = None

    # ------------------------------------------------------------------ serving

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def fhir_base(self) -> str:
        return f"{self.base}/fhir"

    def start(self) -> EhrSimulator:
        from werkzeug.serving import make_server

        self._server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.port = self._server.server_port
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def register(self, client: Client) -> Client:
        self.clients[client.client_id] = client
        return client

    def new_launch(self, patient: str = PATIENT, study: str | None = None) -> str:
        """An EHR launch token for the patient's chart (and one ImagingStudy, if given)."""
        launch = secrets.token_urlsafe(16)
        context: dict[str, Any] = {"patient": patient}
        if study:
            context["fhirContext"] = [{"reference": f"ImagingStudy/{study}"}]
        self.launches[launch] = context
        return launch

    # ------------------------------------------------------------------ the app

    def _make_app(self) -> Flask:
        app = Flask("ehr_simulator")
        app.config["OAUTH2_REFRESH_TOKEN_GENERATOR"] = True
        sim = self

        server = AuthorizationServer(app, query_client=self.clients.get, save_token=self._save)

        class AuthorizationCodeGrant(grants.AuthorizationCodeGrant):
            TOKEN_ENDPOINT_AUTH_METHODS = [
                "client_secret_basic",
                "client_secret_post",
                "private_key_jwt",
                "none",
            ]

            def save_authorization_code(self, code: str, req: Any) -> None:
                payload = req.payload
                sim.codes[code] = Code(
                    code=code,
                    client_id=req.client.client_id,
                    redirect_uri=payload.redirect_uri,
                    scope=payload.scope,
                    user=req.user,
                    context=getattr(req, "smart_context", {}),
                    code_challenge=payload.data.get("code_challenge"),
                    code_challenge_method=payload.data.get("code_challenge_method"),
                    nonce=payload.data.get("nonce"),
                )

            def query_authorization_code(self, code: str, client: Any) -> Code | None:
                found = sim.codes.get(code)
                return found if found and found.client_id == client.client_id else None

            def delete_authorization_code(self, code: Code) -> None:
                sim.codes.pop(code.code, None)
                sim.used_codes.append(code.code)

            def authenticate_user(self, code: Code) -> str:
                self.request.smart_context = code.context
                return code.user

        class RefreshTokenGrant(grants.RefreshTokenGrant):
            TOKEN_ENDPOINT_AUTH_METHODS = AuthorizationCodeGrant.TOKEN_ENDPOINT_AUTH_METHODS
            INCLUDE_NEW_REFRESH_TOKEN = True

            def authenticate_refresh_token(self, refresh_token: str) -> Any:
                return sim.refresh_tokens.get(refresh_token)

            def authenticate_user(self, credential: Any) -> str:
                self.request.smart_context = credential["context"]
                return str(credential["user"])

            def revoke_old_credential(self, credential: Any) -> None:
                sim.refresh_tokens.pop(credential["refresh_token"], None)

        class SmartOpenIDCode(OpenIDCode):
            def resolve_client_private_key(self, client: Any) -> Any:
                return sim.other_key if sim.id_token_mode == "bad_signature" else sim.key

            def get_client_claims(self, client: Any) -> dict[str, Any]:
                now = int(time.time())
                aud = "someone-else" if sim.id_token_mode == "wrong_aud" else client.client_id
                exp = now - 3600 if sim.id_token_mode == "expired" else now + 300
                return {"iss": sim.fhir_base, "aud": [aud], "exp": exp, "iat": now - 5}

            def get_encode_header(self, client: Any) -> dict[str, str]:
                return {"alg": "RS256", "kid": "ehr-1"}

            def exists_nonce(self, nonce: str, req: Any) -> bool:
                return False

            def generate_user_info(self, user: str, scope: str) -> dict[str, Any]:
                info: dict[str, Any] = {"sub": user}
                if "fhirUser" in scope.split():
                    base = sim.fhir_user_base or sim.fhir_base
                    info["fhirUser"] = f"{base}/Practitioner/{user}"
                return info

            def process_token(self, grant: Any, response: Any) -> Any:
                token = super().process_token(grant, response)
                context = getattr(grant.request, "smart_context", {}) or {}
                if not sim.omit_patient and context.get("patient"):
                    token["patient"] = context["patient"]
                if context.get("fhirContext"):
                    token["fhirContext"] = context["fhirContext"]
                token["need_patient_banner"] = False
                sim.tokens[token["access_token"]]["patient"] = context.get("patient")
                if token.get("refresh_token"):
                    sim.refresh_tokens[token["refresh_token"]] = RefreshCredential(
                        refresh_token=token["refresh_token"],
                        user=grant.request.user,
                        context=context,
                        scope=token.get("scope", ""),
                        client_id=grant.request.client.client_id,
                    )
                return token

        class RefreshContext:
            def __call__(self, grant: Any) -> None:
                grant.register_hook("after_create_token_response", self.process)

            def process(self, grant: Any, response: Any) -> None:
                _, token, _ = response
                context = grant.request.smart_context
                sim.tokens[token["access_token"]]["patient"] = context.get("patient")
                token["patient"] = context.get("patient")
                sim.refresh_tokens[token["refresh_token"]] = RefreshCredential(
                    refresh_token=token["refresh_token"],
                    user=grant.request.user,
                    context=context,
                    scope=token.get("scope", ""),
                    client_id=grant.request.client.client_id,
                )

        class PrivateKeyJwt(JWTBearerClientAssertion):
            CLIENT_AUTH_METHOD = "private_key_jwt"

            def resolve_client_public_key(self, client: Any) -> Any:
                return RSAKey.import_key(client.public_jwk)

            def get_audiences(self) -> list[str]:
                return [f"{sim.base}/auth/token"]

            def process_assertion_claims(self, assertion: str, resolve_key: Any) -> Any:
                # SMART's asymmetric client authentication signs with RS384 or ES384
                token = jwt.decode(assertion, resolve_key, algorithms=["RS384", "ES384"])
                self.verify_claims(token.claims)
                return token.claims

        server.register_grant(
            AuthorizationCodeGrant, [CodeChallenge(required=True), SmartOpenIDCode()]
        )
        server.register_grant(RefreshTokenGrant, [RefreshContext()])
        server.register_client_auth_method(
            "private_key_jwt", PrivateKeyJwt(None, validate_jti=False)
        )

        @app.get("/fhir/.well-known/smart-configuration")
        def smart_configuration() -> Any:
            return jsonify(
                {
                    "issuer": sim.fhir_base,
                    "jwks_uri": f"{sim.base}/jwks",
                    "authorization_endpoint": f"{sim.base}/auth/authorize",
                    "token_endpoint": f"{sim.base}/auth/token",
                    "grant_types_supported": ["authorization_code", "refresh_token"],
                    "token_endpoint_auth_methods_supported": [
                        "client_secret_basic",
                        "private_key_jwt",
                    ],
                    "token_endpoint_auth_signing_alg_values_supported": ["RS384"],
                    "scopes_supported": [
                        "openid",
                        "fhirUser",
                        "launch",
                        "launch/patient",
                        "patient/*.rs",
                        "patient/DocumentReference.c",
                        "offline_access",
                    ],
                    "response_types_supported": ["code"],
                    "code_challenge_methods_supported": ["S256"],
                    "capabilities": sim.capabilities,
                }
            )

        @app.get("/jwks")
        def jwks() -> Any:
            return jsonify(KeySet([sim.key]).as_dict(private=False))

        @app.route("/auth/authorize", methods=["GET", "POST"])
        def authorize() -> Any:
            sim.authorize_requests.append(dict(request.values))
            launch = request.values.get("launch")
            if launch:
                context = sim.launches.get(launch)
                if context is None:
                    abort(400, "unknown launch")
            else:  # standalone: the EHR's patient picker
                chosen = request.values.get("picked_patient")
                if not chosen:
                    return _picker(request.query_string.decode(), sim.resources["Patient"])
                context = {"patient": chosen}
            if request.values.get("aud", "").rstrip("/") != sim.fhir_base:
                abort(400, "aud is not this FHIR server")
            grant = server.get_consent_grant(end_user=PRACTITIONER)
            grant.request.smart_context = context
            return server.create_authorization_response(grant=grant, grant_user=PRACTITIONER)

        @app.post("/auth/token")
        def token() -> Any:
            sim.token_requests.append(dict(request.form))
            return server.create_token_response()

        @app.get("/chart/<patient>")
        def chart(patient: str) -> Any:
            app_url = request.args.get("app", "")
            query = urlencode({"app": app_url, "patient": patient})
            items = [f'<li><a id="launch-emix" href="/launch?{query}">emix</a></li>']
            for s in sim.resources["ImagingStudy"].values():
                if s["subject"]["reference"] == f"Patient/{patient}":
                    query = urlencode({"app": app_url, "patient": patient, "study": s["id"]})
                    items.append(
                        f'<li><a class="study-launch" href="/launch?{query}">'
                        f"{s['description']} (open in emix)</a></li>"
                    )
            return (
                "<!doctype html><title>Chart</title><h1>Chart of patient</h1><ul>"
                + "".join(items)
                + "</ul>"
            )

        @app.get("/emr/<patient>")
        def emr(patient: str) -> Any:
            """The EMR's own page, with the chart (and the apps it launches) in an iframe."""
            chart = f"/chart/{patient}?{urlencode({'app': request.args.get('app', '')})}"
            return (
                "<!doctype html><title>EMR</title><h1>EMR</h1>"
                f'<iframe id="chart" src="{chart}" width="1200" height="800"></iframe>'
            )

        @app.get("/launch")
        def start_launch() -> Any:
            launch = sim.new_launch(request.args["patient"], request.args.get("study"))
            from flask import redirect

            query = urlencode({"iss": sim.fhir_base, "launch": launch})
            return redirect(f"{request.args['app']}?{query}")

        @app.post("/fhir/DocumentReference")
        def create_document() -> Any:
            granted = sim._granted()
            if "patient/DocumentReference.c" not in granted["scope"].split():
                abort(403)
            resource = request.get_json(force=True)
            if resource.get("subject", {}).get("reference") != f"Patient/{granted['patient']}":
                abort(403)
            resource["id"] = f"doc-{len(sim.resources['DocumentReference']) + 1}"
            sim.resources["DocumentReference"][resource["id"]] = resource
            answer = jsonify(resource)
            answer.status_code = 201
            answer.headers["Location"] = f"{sim.fhir_base}/DocumentReference/{resource['id']}"
            return answer

        @app.get("/fhir/<resource_type>/<resource_id>")
        def read(resource_type: str, resource_id: str) -> Any:
            granted = sim._granted()
            found = sim.resources.get(resource_type, {}).get(resource_id)
            if found is None or not sim._visible(found, granted):
                abort(404)
            return jsonify(found)

        @app.get("/fhir/<resource_type>")
        def search(resource_type: str) -> Any:
            granted = sim._granted()
            patient = request.args.get("patient", "")
            if patient != granted.get("patient"):
                abort(403)
            entries = [
                {"resource": r}
                for r in sim.resources.get(resource_type, {}).values()
                if r.get("subject", {}).get("reference") == f"Patient/{patient}"
            ]
            return jsonify({"resourceType": "Bundle", "type": "searchset", "entry": entries})

        return app

    def _save(self, token: dict[str, Any], req: Any) -> None:
        self.tokens[token["access_token"]] = {
            "expires": time.time() + self.access_ttl,
            "scope": token.get("scope", ""),
            "user": req.user,
        }
        token["expires_in"] = self.access_ttl

    def _granted(self) -> dict[str, Any]:
        header = request.headers.get("Authorization", "")
        granted = self.tokens.get(header.removeprefix("Bearer "))
        if not header.startswith("Bearer ") or granted is None or granted["expires"] < time.time():
            abort(401)
        return granted

    @staticmethod
    def _visible(resource: dict[str, Any], granted: dict[str, Any]) -> bool:
        kind = resource["resourceType"]
        if kind == "Practitioner":
            return resource["id"] == granted["user"]
        if kind == "Patient":
            return resource["id"] == granted.get("patient")
        return resource.get("subject", {}).get("reference") == f"Patient/{granted.get('patient')}"


def _picker(query: str, patients: dict[str, Any]) -> str:
    rows = "".join(
        f'<li><a href="/auth/authorize?{query}&picked_patient={p["id"]}">'
        f"{p['name'][0]['family']}, {' '.join(p['name'][0]['given'])}</a></li>"
        for p in patients.values()
    )
    return f"<!doctype html><title>Choose a patient</title><h1>Choose a patient</h1><ul>{rows}</ul>"


def sample_resources(patient_id: str = "PID-7734-XQ", study_uid: str = "") -> dict[str, Any]:
    """The EHR's FHIR data: the test patient, a radiologist, a study and its report."""
    return {
        "Patient": {
            PATIENT: {
                "resourceType": "Patient",
                "id": PATIENT,
                "identifier": [{"system": "urn:oid:1.2.3.4.5", "value": patient_id}],
                "name": [{"family": "Mustermann", "given": ["Erika"]}],
                "birthDate": "1964-08-12",
                "gender": "female",
            },
            "pat-2": {
                "resourceType": "Patient",
                "id": "pat-2",
                "identifier": [{"system": "urn:oid:1.2.3.4.5", "value": "PID-0002"}],
                "name": [{"family": "Doe", "given": ["John"]}],
                "birthDate": "1970-01-01",
                "gender": "male",
            },
        },
        "Practitioner": {
            PRACTITIONER: {
                "resourceType": "Practitioner",
                "id": PRACTITIONER,
                "name": [{"family": "Lake", "given": ["Dana"]}],
                "telecom": [{"system": "email", "value": "it@lakeside.example.org"}],
            }
        },
        "ImagingStudy": {
            "img-1": {
                "resourceType": "ImagingStudy",
                "id": "img-1",
                "status": "available",
                "subject": {"reference": f"Patient/{PATIENT}"},
                "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}],
                "started": "2024-01-31T10:00:00Z",
                "modality": [{"system": DCM, "code": "CT"}],
                "description": "CT chest outside study",
            }
        },
        "DocumentReference": {},
        "DiagnosticReport": {
            "rep-1": {
                "resourceType": "DiagnosticReport",
                "id": "rep-1",
                "status": "final",
                "subject": {"reference": f"Patient/{PATIENT}"},
                "code": {"text": "CT chest report"},
                "issued": "2024-02-01T08:00:00Z",
                "conclusion": "No acute findings.",
            }
        },
    }
