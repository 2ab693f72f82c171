"""The stream's columns and the row helper; every stage imports them, they import no stage."""
