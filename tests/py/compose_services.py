"""Prints, as JSON, the services of a compose file as `docker-compose config` resolves
them (relative paths made absolute, variables substituted).

  python3 tests/py/compose_services.py docker-compose.yml
"""
import json
import subprocess
import sys

import yaml

out = subprocess.run(["docker-compose", "-f", sys.argv[1], "config"], check=True, capture_output=True, text=True)
print(json.dumps(yaml.safe_load(out.stdout)["services"]))
