"""The two tools the tool-calling tests offer: schemas bounded so that a random model's call
under them ends within a few tokens (a city of at most 10 characters, one digit)."""

import jsonschema_rs

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
        "required": ["city"], "additionalProperties": False}  # fmt: skip
DIGIT = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
         "required": ["n"], "additionalProperties": False}  # fmt: skip
SCHEMAS = {"get_weather": CITY, "pick": DIGIT}
VALID = {name: jsonschema_rs.validator_for(schema) for name, schema in SCHEMAS.items()}
TOOLS = [{"type": "function", "function": {"name": name, "parameters": schema}}
         for name, schema in SCHEMAS.items()]  # fmt: skip
