"""memsvc driven from other languages (Node.js) and from the README's grpcurl examples."""
