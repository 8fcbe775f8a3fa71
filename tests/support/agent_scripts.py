"""What the Python agent scripts the tests run as `command` workers start with: the worker's API
URL, token and job from its environment, and `call(method, path, body)` returning (status, JSON)
with the worker's own token, as a hostile agent would call the API."""

API_CALL = r"""
import json, os, urllib.request, urllib.error
URL, TOKEN, JOB = os.environ["ORCHESTRATOR_URL"], os.environ["ORCHESTRATOR_TOKEN"], os.environ["ORCHESTRATOR_JOB_ID"]
def call(method, path, body=None):
    req = urllib.request.Request(URL + path, method=method, data=json.dumps(body).encode() if body is not None else None)
    req.add_header("Authorization", "Bearer " + TOKEN)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
"""
