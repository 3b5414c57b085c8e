"""Cluster facts every package needs: the instance table, training layouts (TP x PP x DP) and the launch command."""
