"""syncd: keeps HubSpot and Salesforce aligned on one shared sales & marketing glossary."""

__version__ = "0.1.0.dev0"
