#!/bin/sh
# PRE and POST script of every asynchronous node job, run by DAGMan on the submit host from the
# run directory: "claim" hands the job the newest model, "arrive" applies its update.
exec "/usr/bin/python3" payload/dagtrain.pyz lane "$@"
