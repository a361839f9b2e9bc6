"""The simulator with any SimConfig settings, as JSON in argv[1]: python sim_server.py '{"port": 8000}'."""

import json
import sys

from batchkimi.simulator import SimConfig, serve

serve(SimConfig.from_mapping(json.loads(sys.argv[1])))
