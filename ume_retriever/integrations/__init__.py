"""Framework adapters: ``ume_retriever.integrations.langchain`` (``langchain`` extra) and
``ume_retriever.integrations.llama_index`` (``llama-index`` extra). Both are thin layers over
``UMEIndex`` and ``UMEEncoder``; the shared hit-to-metadata mapping lives in ``hits``."""
